"""The one data-access layer on both backends: schema migrations, a store written before
migrations existed, copying a SQLite store into PostgreSQL, job claims racing on PostgreSQL, and
times on the database's clock whatever a worker's clock says.

``database_url`` (tests/conftest.py) runs a test on a SQLite file and on a database of its own on
a real PostgreSQL server; tests about PostgreSQL only ask for ``postgres``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import WEBHOOK_HEADERS
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from rlhf_cli.main import main
from rlhf_core import schema
from rlhf_core.db import Database, normalize_url
from rlhf_core.intake import handle_event
from rlhf_core.migrate import copy_store, current_revision, head_revision, upgrade
from rlhf_core.registry import POLICY, REWARD_MODEL, Registry
from rlhf_core.store import IncomingAnnotation, Store

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = "<View><Text name='t' value='$t'/></View>"
DAY_S = 86400.0


def annotation(annotation_id: int, project_id: int = 1, updated: str = "2026-12-01") -> Any:
    return IncomingAnnotation(
        annotation_id=annotation_id,
        project_id=project_id,
        task_id=annotation_id * 10,
        annotator=3,
        task_data={"prompt": f"p{annotation_id}"},
        result=[{"value": {"selected": "left"}}],
        was_cancelled=False,
        ls_updated_at=updated,
        label_config=CONFIG,
    )


def preference(annotation_id: int) -> list[tuple[str, dict]]:
    return [("preference", {"annotation": annotation_id, "chosen": "a", "rejected": "b"})]


def record_version(registry: Registry, kind: str = REWARD_MODEL) -> str:
    version, path = registry.new_version_dir(1, kind)
    registry.record(1, kind, version, path, {}, {"job": 1}, {"accuracy": 0.5})
    return version


# -- the schema --------------------------------------------------------------------------------


def test_the_migrated_schema_is_the_one_the_queries_are_written_against(database_url):
    database = Database(database_url)
    assert upgrade(database) == head_revision()
    with database.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert differences == []


def test_a_plain_libpq_url_is_given_the_psycopg_driver():
    url = normalize_url("postgresql://rlhf:secret@db.internal:5433/rlhf")
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database, url.password) == (
        "db.internal",
        5433,
        "rlhf",
        "secret",
    )
    assert "secret" not in repr(Database(url))


def test_migrations_started_at_once_by_several_processes_all_succeed(postgres):
    url = postgres.create_database()
    script = (
        "import sys; from rlhf_core.db import Database; from rlhf_core.migrate import upgrade; "
        "print(upgrade(Database(sys.argv[1])))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 3, outcomes
    assert {out.strip() for out, _ in outcomes} == {head_revision()}


def test_migrate_command_makes_the_default_store_and_is_idempotent(tmp_path, capsys):
    argv = ["migrate", "--data-dir", str(tmp_path)]
    assert main(argv) == 0 and main(argv) == 0
    assert capsys.readouterr().out.count(f"schema at revision {head_revision()}") == 2
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]


# -- a store written before migrations existed -------------------------------------------------


def pre_alembic_store(path: Path) -> None:
    """A store as main's code left it: its DDL (tests/fixtures/pre_alembic_store.sql) and a
    row in every table, no ``alembic_version``."""
    with sqlite3.connect(path) as conn:
        conn.executescript((FIXTURES / "pre_alembic_store.sql").read_text())
        conn.executescript(
            f"""
            INSERT INTO label_configs VALUES ('abc', "{CONFIG}");
            INSERT INTO projects(project_id, config_hash, hostname, access_token, model_version,
                                 updated_at, token_sealed, webhook_secret_sealed)
                VALUES (1, 'abc', 'http://ls', NULL, 'rm-0001.policy-base', 1.0, 'sealed-token',
                        'sealed-secret');
            INSERT INTO annotations VALUES (5, 1, 50, 3, 'abc', '{{"prompt": "p5"}}',
                '[{{"value": {{"selected": "left"}}}}]', 0, '2026-11-01', 0, 'preference', 7, 1.0);
            INSERT INTO annotations VALUES (6, 1, 60, NULL, NULL, NULL, NULL, 0, '', 1, '', 8, 1.0);
            INSERT INTO records(annotation_id, project_id, kind, payload)
                VALUES (5, 1, 'preference', '{{"annotation": 5}}');
            INSERT INTO jobs(project_id, kind, status, trigger, attempts, seq_at_enqueue,
                             created_at, finished_at, result)
                VALUES (1, 'train', 'done', 'annotations', 1, 7, 1.0, 2.0, '{{"promoted": true}}');
            INSERT INTO counters VALUES ('seq', 8);
            INSERT INTO task_models VALUES (1, 50, 'policy-base', 'rm-0001');
            INSERT INTO arena_responses VALUES (1, 50, 'h', 'policy-base', 12, 0.5, 'rm-0001', 1.0);
            INSERT INTO model_versions VALUES (1, 'rm', 1, 'rm-0001', '/m/rm-0001', 'promoted',
                NULL, '{{}}', '{{"job": 1}}', '{{"accuracy": 0.9}}', 1.0, 2.0);
            INSERT INTO label_studio_syncs(project_id, model_version, status, created_at,
                                           next_attempt_at)
                VALUES (1, 'rm-0001.policy-base', 'pending', 2.0, 2.0);
            INSERT INTO model_pins VALUES (1, 'rm', 'rm-0001', 'known good', 3.0);
            """
        )


def test_a_store_written_before_migrations_is_upgraded_in_place_keeping_every_row(tmp_path):
    path = tmp_path / "store.sqlite3"
    pre_alembic_store(path)
    with sqlite3.connect(path) as conn:
        before = {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in schema.COPY_ORDER
        }

    store = Store(path).initialize()
    registry = Registry(path, tmp_path / "models")

    with sqlite3.connect(path) as conn:
        after = {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in schema.COPY_ORDER
        }
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert after == before and all(before.values())
    assert revision == head_revision()
    assert [(a.annotation_id, a.task_data) for a in store.annotations(1)] == [(5, {"prompt": "p5"})]
    assert store.records(1) == [{"annotation": 5}]
    project = store.project(1)
    assert (project.label_config, project.token_sealed) == (CONFIG, "sealed-token")
    assert [(j.kind, j.status, j.result) for j in store.jobs(1)] == [
        ("train", "done", {"promoted": True})
    ]
    assert registry.served_version(1) == "rm-0001.policy-base"
    assert registry.served(1, REWARD_MODEL).artifact_sha256 is None
    assert registry.pins(1)[REWARD_MODEL].reason == "known good"
    assert [s.model_version for s in registry.pending_syncs(1)] == ["rm-0001.policy-base"]

    # It keeps working: a new annotation continues the change counter; a tombstone stays one.
    assert store.upsert_annotation(annotation(7), preference(7))
    assert not store.upsert_annotation(annotation(6), preference(6))
    assert [a.annotation_id for a in store.annotations(1)] == [5, 7]
    Store(path).initialize()  # and opening it again changes nothing


def test_plaintext_tokens_of_an_old_store_are_sealed_and_leave_the_files(tmp_path):
    path = tmp_path / "store.sqlite3"
    pre_alembic_store(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE projects SET access_token = 'plain-token-4242', token_sealed = NULL")

    store = Store(path).initialize(seal=lambda token: f"sealed({len(token)})")

    assert store.project(1).token_sealed == "sealed(16)"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT access_token FROM projects").fetchall() == [(None,)]
    for file in tmp_path.glob("store.sqlite3*"):
        assert b"plain-token-4242" not in file.read_bytes(), file.name


# -- copying a SQLite store into PostgreSQL ----------------------------------------------------


def rows_of(database: Database) -> dict[str, list[dict]]:
    with database.read() as conn:
        return {
            name: [
                dict(row)
                for row in conn.execute(
                    select(table).order_by(*table.primary_key.columns)
                ).mappings()
            ]
            for name, table in schema.metadata.tables.items()
        }


def test_migrate_from_copies_a_sqlite_store_into_postgresql(
    tmp_path, postgres, monkeypatch, capsys
):
    source_path = tmp_path / "old" / "store.sqlite3"
    source_path.parent.mkdir()
    pre_alembic_store(source_path)
    store = Store(source_path).initialize()
    store.upsert_annotation(annotation(9), preference(9))
    store.enqueue_training(1, "annotations")
    registry = Registry(source_path, tmp_path / "models")
    registry.promote(1, {REWARD_MODEL: record_version(registry)})
    target_url = postgres.create_database()
    monkeypatch.setenv("RLHF_DATABASE_URL", target_url)

    assert main(["migrate", "--from", f"sqlite:///{source_path}", "--data-dir", str(tmp_path)]) == 0

    copied = json.loads(capsys.readouterr().out)["copied"]
    source, target = Database(source_path), Database(target_url)
    assert rows_of(target) == rows_of(source)
    assert copied["annotations"] == 3 and copied["model_versions"] == 2
    # Ids made after the copy continue after the copied ones.
    moved = Store(target)
    newest = max(j.job_id for j in moved.jobs(1))
    moved.finish_job(newest, "done")
    assert moved.enqueue_training(1, "cli").job_id == newest + 1
    # The pin came along: rm-0001 is served although rm-0002 was promoted after it.
    assert Registry(target, tmp_path / "models").served_version(1) == "rm-0001.policy-base"
    # A second copy would mix two stores: refused, and nothing changes.
    assert main(["migrate", "--from", f"sqlite:///{source_path}", "--data-dir", str(tmp_path)]) == 2
    assert "already holds a store" in capsys.readouterr().err
    assert len(rows_of(target)["annotations"]) == 3


def test_copy_store_into_the_same_database_is_refused(tmp_path):
    database = Database(tmp_path / "store.sqlite3")
    with pytest.raises(Exception, match="already names"):
        copy_store(database, Database(tmp_path / "store.sqlite3"))


# -- jobs for many machines --------------------------------------------------------------------


def test_claimers_racing_on_postgresql_never_take_one_job_twice(postgres):
    url = postgres.create_database()
    store = Store(url).initialize()
    jobs = [store.enqueue_job(project, "train", "test").job_id for project in range(1, 61)]
    claimed: list[tuple[str, int]] = []
    start = threading.Barrier(6)

    def claim(name: str) -> None:
        mine = Store(Database(url))
        start.wait()
        while (job := mine.claim_job(name)) is not None:
            claimed.append((name, job.job_id))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert sorted(job_id for _, job_id in claimed) == jobs  # each exactly once
    assert len({name for name, _ in claimed}) > 1  # they really raced
    assert all(j.status == "running" and j.attempts == 1 for j in store.jobs())


def test_one_running_training_per_project_is_held_by_the_database(database_url):
    store = Store(database_url).initialize()
    # Two queued trainings of one project (enqueue coalesces; a requeue after a crash may not).
    with store.db.write() as conn:
        for _ in range(2):
            conn.execute(
                insert(schema.jobs).values(
                    project_id=1,
                    kind="train",
                    status="queued",
                    trigger="t",
                    seq_at_enqueue=0,
                    created_at=0.0,
                )
            )
    start = threading.Barrier(4)
    claimed = []

    def claim(name: str) -> None:
        start.wait()
        claimed.append(Store(Database(database_url)).claim_job(name))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len([job for job in claimed if job is not None]) == 1
    # Not the claim's good manners alone: the database refuses a second running training.
    with pytest.raises(IntegrityError), store.db.write() as conn:
        conn.execute(
            update(schema.jobs).where(schema.jobs.c.status == "queued").values(status="running")
        )
    assert store.start_job(1, "train", "cli", "elsewhere") is None
    assert store.claim_job("late") is None


@pytest.mark.parametrize("skew_s", [DAY_S, -DAY_S])
def test_a_skewed_worker_clock_neither_requeues_a_live_job_nor_keeps_a_dead_one(
    database_url, monkeypatch, skew_s
):
    store = Store(database_url).initialize()
    live = store.enqueue_training(1, "t")
    assert store.claim_job("w1").job_id == live.job_id
    real_time = time.time

    def skew() -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + skew_s)

    skew()  # a worker whose clock is a day off looks for stale jobs, and beats for its own
    assert store.recover_stale_jobs(stale_after_s=60, max_attempts=3) == []
    store.heartbeat(live.job_id)
    monkeypatch.setattr(time, "time", real_time)  # a worker with the right time looks
    assert store.recover_stale_jobs(stale_after_s=60, max_attempts=3) == []
    assert store.job(live.job_id).status == "running"
    assert 0 <= store.seconds_since_job(1, "train") < 60

    # A job whose worker stopped beating two minutes ago is stale, whatever the clock looking.
    with store.db.write() as conn:
        conn.execute(
            update(schema.jobs)
            .where(schema.jobs.c.job_id == live.job_id)
            .values(heartbeat_at=schema.jobs.c.heartbeat_at - 120)
        )
    skew()
    assert store.recover_stale_jobs(stale_after_s=60, max_attempts=3) == [live.job_id]
    assert store.job(live.job_id).status == "queued"


def test_promotions_keep_their_order_whatever_the_promoting_machine_clock(
    database_url, tmp_path, monkeypatch
):
    Store(database_url).initialize()
    registry = Registry(database_url, tmp_path / "models")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + DAY_S)  # a fast clock promotes first
    registry.promote(1, {REWARD_MODEL: record_version(registry)})
    monkeypatch.setattr(time, "time", lambda: real_time() - DAY_S)  # then a slow one
    second = record_version(registry)
    registry.promote(1, {REWARD_MODEL: second, POLICY: record_version(registry, POLICY)})

    assert registry.served_version(1) == f"{second}.policy-0001"
    # The outbox's retry times are on the database's clock too: a due sync is due.
    [sync] = registry.pending_syncs(1, due=True)
    assert sync.model_version == f"{second}.policy-0001"


def test_artifact_hash_is_read_and_written_by_the_registry(database_url, tmp_path):
    Store(database_url).initialize()
    registry = Registry(database_url, tmp_path / "models")
    version, path = registry.new_version_dir(1, REWARD_MODEL)
    recorded = registry.record(
        1, REWARD_MODEL, version, path, {}, {}, {}, artifact_sha256="ab" * 32
    )
    assert recorded.artifact_sha256 == "ab" * 32
    registry.set_artifact_sha256(1, REWARD_MODEL, version, "cd" * 32)
    assert registry.get(1, REWARD_MODEL, version).artifact_sha256 == "cd" * 32


def test_annotation_writes_from_many_threads_get_distinct_change_numbers(database_url):
    store = Store(database_url).initialize()
    store.upsert_project(1, CONFIG)

    def write(first: int) -> None:
        mine = Store(Database(database_url))
        for annotation_id in range(first, first + 10):
            mine.upsert_annotation(annotation(annotation_id), preference(annotation_id))

    threads = [threading.Thread(target=write, args=(i * 10,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    with store.db.read() as conn:
        seqs = conn.execute(select(schema.annotations_table.c.seq)).scalars().all()
        count = conn.execute(select(func.count()).select_from(schema.records)).scalar_one()
    assert len(seqs) == len(set(seqs)) == 40 and count == 40
    assert store.enqueue_training(1, "annotations", min_new=40) is not None


# -- one webhook, one write transaction -------------------------------------------------------


def fail_on_insert_into(database: Database, table: str) -> None:
    """Make every ``INSERT INTO <table>`` on ``database`` fail (an injected fault)."""

    @event.listens_for(database.engine, "before_cursor_execute")
    def _fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()} "):
            raise RuntimeError(f"injected failure: INSERT INTO {table}")


def test_a_webhook_that_fails_at_its_training_trigger_stores_nothing(
    database_url, annotation_event
):
    """The annotation, its records and the queued job commit together: a failure after the
    records are written (here, queueing the training) leaves none of them, and the webhook
    is not acknowledged (Label Studio sends it again)."""
    store = Store(database_url).initialize()
    handle_event(store, annotation_event(1), train_every=0, proven=True)  # the project known
    fail_on_insert_into(store.db, "jobs")
    with pytest.raises(RuntimeError, match="injected failure"):
        handle_event(store, annotation_event(2, task_id=2), train_every=1, proven=True)
    assert [a.annotation_id for a in store.annotations(1)] == [1]
    assert [r["annotation"] for r in store.records(1)] == [1]
    assert store.jobs() == []


def test_an_annotation_webhook_is_one_write_transaction(database_url, annotation_event):
    store = Store(database_url).initialize()
    handle_event(store, annotation_event(1), train_every=0, proven=True)  # the project known
    begun: list[bool] = []

    @event.listens_for(store.db.engine, "begin")
    def _count(conn: Any) -> None:
        begun.append(conn.get_execution_options().get("rlhf_write", False))

    result = handle_event(store, annotation_event(2, task_id=2), train_every=1, proven=True)
    assert result.status == "stored" and result.detail["job_id"] is not None
    assert begun.count(True) == 1, f"write transactions: {begun.count(True)}"
    assert len(begun) <= 2, f"transactions in all: {len(begun)}"  # and one read: the project
    assert [job.job_id for job in store.jobs()] == [result.detail["job_id"]]


# -- two servers, one PostgreSQL ----------------------------------------------------------------


@pytest.mark.slow
def test_two_servers_with_their_own_data_dirs_share_one_postgresql(
    tmp_path, postgres, server_factory, captured, annotation_event
):
    """The issue's check: a project set up and annotated through one server is served by the
    other, and the annotations are rows in PostgreSQL."""
    from fake_label_studio import FakeLabelStudio

    url = postgres.create_database()
    env = {"RLHF_DATABASE_URL": url, "RLHF_SECRET_KEY": "k" * 40}  # one key for every machine
    with FakeLabelStudio() as ls:
        ls.add_project(1)
        first = server_factory(tmp_path / "machine-a", workers=1, env=env)
        second = server_factory(tmp_path / "machine-b", workers=1, env=env)

        setup = {**captured("01_setup"), "hostname": ls.url, "access_token": "token-for-ls"}
        assert requests.post(f"{first.url}/setup", json=setup, timeout=60).status_code == 200
        for annotation_id in (1, 2, 3):
            body = annotation_event(annotation_id, task_id=annotation_id)
            answer = requests.post(
                f"{first.url}/webhook", json=body, headers=WEBHOOK_HEADERS, timeout=60
            )
            assert answer.json()["status"] == "stored"

        # The second server knows the project: /predict without a label config uses the
        # stored one, and the project's state is what the first server made.
        predict = captured("04_predict")
        del predict["label_config"]
        answer = requests.post(f"{second.url}/predict", json=predict, timeout=120)
        assert answer.status_code == 200, answer.text
        [[prediction], _] = answer.json()["results"]
        assert prediction["model_version"] == "rm-untrained.policy-base"
        summary = requests.get(f"{second.url}/api/projects/1/summary", timeout=60).json()
        assert [job["kind"] for job in summary["jobs"]] == ["reconcile"]  # queued by /setup
        assert sum(row["labels"] for row in summary["annotators"]) == 3

    with Database(url).read() as conn:
        rows = conn.execute(
            select(
                schema.annotations_table.c.annotation_id, schema.annotations_table.c.task_id
            ).where(schema.annotations_table.c.project_id == 1)
        ).all()
        project = conn.execute(select(schema.projects).where(schema.projects.c.project_id == 1))
        [project] = project.mappings().all()
    assert sorted(rows) == [(1, 1), (2, 2), (3, 3)]
    assert project["hostname"] == ls.url and "token-for-ls" not in project["token_sealed"]
    assert not list(tmp_path.glob("machine-*/store.sqlite3*"))  # nothing went to SQLite
