"""Three worker "machines" on one database and one artifact volume.

Each worker is its own process (``tests/multi_machine_worker.py``: the real worker loop, with
a cheap stand-in for training) with its own ``RLHF_DATA_DIR``; they share the database (a real
PostgreSQL server; and, as on one host, a SQLite file) and ``RLHF_ARTIFACT_DIR``. 200 jobs over
5 projects are queued while they run; one worker is killed (SIGKILL) in the middle of a job.
Every job must finish exactly once, no project may ever have two trainings running at once, the
killed worker's job must be finished by another worker after the staleness timeout, and a job
that runs longer than that timeout on a live worker must not be taken from it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from rlhf_core.artifacts import verify
from rlhf_core.store import JOB_DONE, JOB_TRAIN, Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multi_machine_worker.py")
PROJECTS = 5
JOBS = 200
STALE_AFTER_S = 2.0
SHORT_JOB_S = 0.01
LONG_JOB_S = 3.0  # longer than the staleness timeout: its live worker's heartbeats must keep it
DEADLINE_S = 120.0


def machine_env(
    data_dir: Path, database_url: str, artifact_dir: Path, hang: bool = False
) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RLHF_DATA_DIR": str(data_dir),
        "RLHF_DATABASE_URL": database_url,
        "RLHF_ARTIFACT_DIR": str(artifact_dir),
        "RLHF_JOB_STALE_AFTER_S": str(STALE_AFTER_S),
        "RLHF_RECONCILE_EVERY_S": "0",
        "LOG_LEVEL": "WARNING",
    }
    if hang:
        env["MULTI_MACHINE_HANG"] = "1"
    return env


def read_events(paths: list[Path]) -> list[dict[str, Any]]:
    events = []
    for path in paths:
        if path.exists():
            events += [json.loads(line) for line in path.read_text().splitlines() if line]
    return events


def queue_plan() -> dict[int, list[str]]:
    """Each project's jobs, in order: triggers saying how long the stand-in training sleeps."""
    plan: dict[int, list[str]] = defaultdict(list)
    for k in range(JOBS):
        plan[k % PROJECTS + 1].append(f"sleep:{SHORT_JOB_S}")
    plan[3][len(plan[3]) // 2] = f"sleep:{LONG_JOB_S}"
    return plan


def test_three_workers_run_200_jobs_once_each_one_training_per_project_and_survive_a_kill(
    tmp_path: Path, database_url: str
) -> None:
    artifacts = tmp_path / "artifacts"
    store = Store(database_url).initialize()
    logs = [tmp_path / f"worker-{i}.events.jsonl" for i in range(3)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(logs[i])],
            env=machine_env(tmp_path / f"machine-{i}", database_url, artifacts, hang=i == 0),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"worker-{i}.log", "wb"),  # noqa: SIM115
        )
        for i in range(3)
    ]
    victim = workers[0]
    killed_at: float | None = None
    started = time.monotonic()
    try:
        plan = queue_plan()
        queued = 0
        while time.monotonic() - started < DEADLINE_S:
            for project, triggers in plan.items():
                # One job of a kind waits per project (the store coalesces a burst into one):
                # the next is queued once a worker took the last.
                if triggers and store.enqueue_job(project, JOB_TRAIN, triggers[0]):
                    triggers.pop(0)
                    queued += 1
            if killed_at is None and any(e["event"] == "start" for e in read_events(logs[:1])):
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed_at = time.time()
            jobs = store.jobs()
            if queued == JOBS and sum(job.status == JOB_DONE for job in jobs) == JOBS:
                break
            for i, worker in enumerate(workers[1:], start=1):
                assert worker.poll() is None, (tmp_path / f"worker-{i}.log").read_text()[-3000:]
            time.sleep(0.02)
        else:
            pytest.fail(f"not done after {DEADLINE_S:.0f} s: {Counter(j.status for j in jobs)}")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(timeout=30)

    assert killed_at is not None, "the victim never started a job"
    events = read_events(logs)
    starts = [e for e in events if e["event"] == "start"]
    ends = {e["job"]: e for e in events if e["event"] == "end"}
    ended = Counter(e["job"] for e in events if e["event"] == "end")
    jobs = {job.job_id: job for job in store.jobs()}
    assert len(jobs) == JOBS and all(job.status == JOB_DONE for job in jobs.values())
    assert set(ended) == set(jobs) and set(ended.values()) == {1}, "a job finished twice"

    # The killed worker's job: started again by another worker after the staleness timeout,
    # finished there. Every other job (the long one included) started exactly once.
    (killed,) = [e for e in starts if e["pid"] == victim.pid]
    rerun = [e for e in starts if e["job"] == killed["job"] and e["pid"] != victim.pid]
    assert len(rerun) == 1 and rerun[0]["t"] >= killed_at
    assert ends[killed["job"]]["pid"] == rerun[0]["pid"] != victim.pid
    assert jobs[killed["job"]].attempts == 2
    started_count = Counter(e["job"] for e in starts)
    assert {j: n for j, n in started_count.items() if n != 1} == {killed["job"]: 2}
    survivors = {e["pid"] for e in ends.values()}
    assert survivors == {workers[1].pid, workers[2].pid}, "both live workers took jobs"

    # Never two trainings of one project at once: each project's runs, start to end (the killed
    # one to the moment it was killed), follow one another.
    runs: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for start in starts:
        end = ends.get(start["job"]) if start["pid"] != victim.pid else None
        runs[start["project"]].append((start["t"], end["t"] if end else killed_at))
    assert sorted(runs) == list(range(1, PROJECTS + 1))
    for project, intervals in runs.items():
        intervals.sort()
        for (_, end), (next_start, _) in itertools.pairwise(intervals):
            assert next_start >= end, f"project {project}: two trainings at once"

    # Every job's checkpoint is on the shared volume, whole, as its hash says.
    for job_id, end in ends.items():
        result = jobs[job_id].result
        assert result is not None and result["sha256"] == end["sha256"]
        verify(Path(result["path"]), result["sha256"])
    assert not [p for p in artifacts.rglob("*") if ".tmp-" in p.name]
