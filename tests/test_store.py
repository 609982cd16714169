"""Reading training records by task (what ``/predict`` needs), on SQLite and PostgreSQL.

``Store.records(project, kind, tasks=...)`` looks the tasks' annotations up by index and must
return exactly what reading the whole project and keeping those tasks' records returned: the
same records in the same (stored) order.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, inspect

from rlhf_core.db import Database
from rlhf_core.migrate import MIGRATIONS
from rlhf_core.store import IncomingAnnotation, Store

CONFIG = "<View><Text name='t' value='$t'/></View>"
# Tasks spread over more than one chunk of ids, written out of task order, so a read by task
# must merge chunks back into the stored order; task 7 has two annotations, far apart.
TASKS = [901, 7, 33_000, 450, 7, 1801, 2, 40_001]


def write_annotation(
    store: Store, annotation_id: int, task_id: int | None, project_id: int = 1
) -> None:
    """One annotation with the records conversion gives it: each carries its task."""
    provenance = {"project": project_id, "task": task_id, "annotation": annotation_id}
    records: list[tuple[str, dict[str, Any]]] = [
        ("preference", {**provenance, "prompt": "p", "chosen": "a", "rejected": "b"}),
        ("ranking", {**provenance, "prompt": "p", "ranking": [["a"], ["b", "c"]]}),
        ("feedback", {**provenance, "response": "a", "score": 1.0}),
    ]
    incoming = IncomingAnnotation(
        annotation_id=annotation_id,
        project_id=project_id,
        task_id=task_id,
        annotator=3,
        task_data={"t": "p"},
        result=[],
        was_cancelled=False,
        ls_updated_at="2026-12-02",
        label_config=CONFIG,
    )
    assert store.store_annotation(incoming, records).stored


@pytest.fixture
def store(database_url: str) -> Store:
    store = Store(database_url).initialize()
    for annotation_id, task_id in enumerate(TASKS, 1):
        write_annotation(store, annotation_id, task_id)
    write_annotation(store, 100, None)  # an annotation Label Studio sent without a task
    write_annotation(store, 101, 2, project_id=2)  # another project's task 2
    return store


def whole_project_read(store: Store, kind: str, tasks: set[Any]) -> list[dict[str, Any]]:
    """What ``/predict`` did before: every record of the project, then those of ``tasks``."""
    return [r for r in store.records(1, kind) if r.get("task") in tasks]


@pytest.mark.parametrize("kind", ["preference", "ranking", "feedback", None])
def test_records_by_task_are_those_tasks_records_in_stored_order(store, kind):
    wanted = {7, 1801, 40_001, 2}
    found = store.records(1, kind, tasks=wanted)
    assert found == whole_project_read(store, kind, wanted)
    assert {r["task"] for r in found} == wanted
    # Stored order (annotation 2 on task 7 ... annotation 5 on task 7 again), not task order.
    assert list(dict.fromkeys(r["annotation"] for r in found)) == [2, 5, 6, 7, 8]


@pytest.fixture
def oldest_sqlite_binds(store: Store) -> None:
    """SQLite as old builds have it: 999 bound variables per statement at most (newer builds
    take 32,766 or more). PostgreSQL's protocol takes 65,535 parameters per statement."""
    if store.path is None:
        return

    def limit(connection: sqlite3.Connection, _: Any) -> None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    event.listen(store.db.engine, "connect", limit)
    store.db.engine.dispose()  # the pooled connections were opened without the limit


def test_records_by_task_read_more_ids_than_one_statement_binds(store, oldest_sqlite_binds):
    """70,000 ids, more than either backend binds in one statement: read in chunks."""
    wanted = set(range(70_000))
    found = store.records(1, "preference", tasks=wanted)
    assert found == whole_project_read(store, "preference", wanted)
    assert [r["annotation"] for r in found] == list(range(1, len(TASKS) + 1))


def test_task_ids_that_are_not_integers_match_nothing_and_do_not_fail_the_query(store):
    """Compared as Python compares them: ``"7"`` is not task 7, ``450.0`` is task 450, None is
    the annotations without a task; a string bound against the integer column would fail the
    query on PostgreSQL, a tuple on both."""
    wanted: set[Any] = {"7", "abc", "", None, 450.0, 2.5, True, (1, 2)}
    found = store.records(1, "preference", tasks=wanted)
    assert found == whole_project_read(store, "preference", wanted)
    assert [r["task"] for r in found] == [450, None]
    assert store.records(1, "preference", tasks={"7", "abc"}) == []
    assert store.records(1, "preference", tasks=set()) == []


def test_records_by_task_stay_in_their_project(store):
    assert [r["annotation"] for r in store.records(2, "preference", tasks={2})] == [101]
    assert [r["annotation"] for r in store.records(1, "preference", tasks={2})] == [7]


def test_reading_by_task_looks_the_tasks_up_rather_than_walking_the_project(tmp_path):
    """Each statement ``records`` sends for tasks searches ``records_task`` (SQLite's plan:
    PostgreSQL's depends on its statistics, and on a table this small is a scan either way)."""
    path = tmp_path / "store.sqlite3"
    store = Store(path).initialize()
    write_annotation(store, 1, 7)
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(store.db.engine, "before_cursor_execute", capture)
    assert [r["task"] for r in store.records(1, "preference", tasks=set(range(1_000)))] == [7]
    event.remove(store.db.engine, "before_cursor_execute", capture)
    reads = [(s, p) for s, p in sent if "FROM records" in s]
    assert len(reads) == 2  # 1,000 ids: two chunks
    with sqlite3.connect(path) as conn:
        plans = [conn.execute(f"EXPLAIN QUERY PLAN {s}", p).fetchall() for s, p in reads]
    for plan in plans:
        assert [row[3] for row in plan] == [
            "SEARCH records USING INDEX records_task (project_id=? AND task_id=? AND kind=?)"
        ]


def migrate_to(database: Database, direction: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.write() as conn:
        config.attributes["connection"] = conn
        getattr(command, direction)(config, revision)


def test_records_stored_before_they_carried_their_task_are_found_by_task(store):
    """Revision 0003 adds ``records.task_id`` and fills it in from the records' annotations."""
    wanted = {7, 2, 40_001}
    before = whole_project_read(store, "preference", wanted)
    migrate_to(store.db, "downgrade", "0002")
    with store.db.read() as conn:
        assert "task_id" not in {c["name"] for c in inspect(conn).get_columns("records")}
    migrate_to(store.db, "upgrade", "head")
    assert store.records(1, "preference", tasks=wanted) == before
    assert [r["annotation"] for r in store.records(2, "ranking", tasks={2})] == [101]
