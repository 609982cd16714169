"""The labels ``/predict`` reads for its tasks, in a project with many records: by task vs. the
whole-project read it replaced, in one run on one store.

    python bench/predict_labels.py --records 200000 --tasks-per-request 32 1000
    python bench/predict_labels.py --database-url postgresql://user@host/db ...

Fills a fresh store (a SQLite file here, or the empty database ``--database-url`` names) with
``--records`` annotations, one record each (four in five a pairwise preference, one in five a
three-item ranking), two annotations per task, written in bulk with the columns the backend
writes (``records.task_id`` included); on PostgreSQL then ``ANALYZE``, as autovacuum does within
a minute of a bulk load (without statistics its planner filters the project's records of the
kind instead of looking the tasks up). Then, for requests of ``--tasks-per-request`` task ids
drawn at random:

* before: the old ``labels_by_task``, reproduced here: every preference and ranking record of
  the project (``Store.records(project, kind)``), kept where the record's task is asked for,
  rankings expanded to pairs (``preference_pairs``);
* after: ``rlhf_core.predict.labels_by_task(store, project, max_pairs, tasks)``, which reads the
  records of those tasks only (``records_task``).

The two take turns request by request and must give the same labels (checked). Prints the
median milliseconds per request of each and the ratio. Only this step of ``/predict`` is timed:
scoring the tasks is the same work either way.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_core.conversion import preference_pairs
from rlhf_core.predict import labels_by_task
from rlhf_core.projects import config_hash
from rlhf_core.schema import annotations_table, label_configs, records
from rlhf_core.store import Store

PROJECT = 1
MAX_RANKING_PAIRS = 50
CONFIG = "<View><Text name='prompt' value='$prompt'/></View>"
BATCH = 10_000


def payload(annotation_id: int, task_id: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A record as conversion writes it, with a prompt and responses of a few hundred chars."""
    base = {"project": PROJECT, "task": task_id, "annotation": annotation_id, "annotator": 3}
    prompt = f"Task {task_id}: " + "explain the trade-offs of this approach " * 3
    answers = [f"Answer {i} to {task_id}: " + "it depends on the workload " * 6 for i in range(3)]
    if annotation_id % 5 == 0:
        ranking = {"ranking": [[a] for a in answers], "source": "ranker", "control": "rank"}
        return "ranking", {**base, "prompt": prompt, **ranking}
    chosen, rejected = rng.sample(answers[:2], 2)
    pair = {"chosen": chosen, "rejected": rejected, "tie": False, "source": "pairwise"}
    return "preference", {**base, "prompt": prompt, **pair, "control": "comparison"}


def fill(store: Store, n_records: int, seed: int = 0) -> int:
    """``n_records`` annotations of one record each, two per task; returns the task count."""
    rng = random.Random(seed)
    digest = config_hash(CONFIG)
    with store.db.write() as conn:
        conn.execute(insert(label_configs).values(config_hash=digest, xml=CONFIG))
        for start in range(1, n_records + 1, BATCH):
            ids = range(start, min(start + BATCH, n_records + 1))
            rows = [(i, (i + 1) // 2, *payload(i, (i + 1) // 2, rng)) for i in ids]
            conn.execute(
                insert(annotations_table),
                [
                    {
                        "annotation_id": i,
                        "project_id": PROJECT,
                        "task_id": task,
                        "annotator": 3,
                        "config_hash": digest,
                        "task_data": "{}",
                        "result": "[]",
                        "kinds": kind,
                        "seq": i,
                        "stored_at": 0.0,
                    }
                    for i, task, kind, _ in rows
                ],
            )
            conn.execute(
                insert(records),
                [
                    {
                        "annotation_id": i,
                        "project_id": PROJECT,
                        "task_id": task,
                        "kind": kind,
                        "payload": json.dumps(record),
                    }
                    for i, task, kind, record in rows
                ],
            )
    return (n_records + 1) // 2


def whole_project_read(store: Store, tasks: set[int]) -> dict[Any, list[dict[str, Any]]]:
    """``labels_by_task`` as it was: the project's records, filtered here."""
    found: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    preferences, rankings = (
        [r for r in store.records(PROJECT, kind) if r.get("task") in tasks]
        for kind in ("preference", "ranking")
    )
    for record in preference_pairs(preferences, rankings, MAX_RANKING_PAIRS):
        found[record.get("task")].append(record)
    return found


def timed_ms(fn: Any, tasks: set[int]) -> tuple[float, Any]:
    started = time.perf_counter()
    answer = fn(tasks)
    return (time.perf_counter() - started) * 1000, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--tasks-per-request", type=int, nargs="+", default=[32, 1000])
    parser.add_argument("--requests", type=int, default=5, help="per size")
    parser.add_argument("--database-url", help="an empty database (default: a SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = Store(args.database_url or Path(directory) / "store.sqlite3").initialize()
        started = time.perf_counter()
        n_tasks = fill(store, args.records)
        if store.db.is_postgresql:  # what autovacuum does within a minute of a bulk load
            with store.db.engine.connect() as conn:
                conn.execute(text("ANALYZE"))
                conn.commit()
        database = "PostgreSQL" if args.database_url else "SQLite"
        elapsed = time.perf_counter() - started
        print(f"{args.records} records on {n_tasks} tasks written in {elapsed:.1f} s ({database})")
        rng = random.Random(1)
        print("| tasks per request | before: whole project (ms) | after: by task (ms) | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for size in args.tasks_per_request:
            requests = [set(rng.sample(range(1, n_tasks + 1), size)) for _ in range(args.requests)]
            before, after = [], []
            for tasks in requests:  # the two take turns: a change of load falls on both
                old_ms, old = timed_ms(lambda t: whole_project_read(store, t), tasks)
                new_ms, new = timed_ms(
                    lambda t: labels_by_task(store, PROJECT, MAX_RANKING_PAIRS, t), tasks
                )
                assert old == new, "the two reads disagree"
                before.append(old_ms)
                after.append(new_ms)
            before_ms, after_ms = statistics.median(before), statistics.median(after)
            ratio = before_ms / after_ms
            print(f"| {size} | {before_ms:.1f} | {after_ms:.2f} | {ratio:.0f}× |")


if __name__ == "__main__":
    main()
