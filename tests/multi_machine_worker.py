"""One "machine" of tests/test_multi_machine.py: the real worker loop with a cheap training.

    python tests/multi_machine_worker.py EVENTS_FILE

Claiming, heartbeats and stale-job recovery are :class:`trainer.worker.Worker`'s own, on the
database and artifact volume the environment names (``RLHF_DATA_DIR`` is this machine's own).
Only the training is a stand-in: it appends ``start`` and ``end`` events (job, project, time,
pid) to ``EVENTS_FILE``, sleeps for the job's ``trigger`` (``sleep:<seconds>``), and writes a
small checkpoint to the shared artifact directory with :func:`rlhf_core.artifacts.write_atomically`.
With ``MULTI_MACHINE_HANG=1`` the first job this worker takes never ends (the test kills it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_core.artifacts import write_atomically
from rlhf_core.config import BackendConfig
from rlhf_core.store import JOB_TRAIN, Job
from trainer.worker import Worker

POLL_S = 0.05


def main(events_path: str) -> None:
    config = BackendConfig.from_env()
    hang = os.environ.get("MULTI_MACHINE_HANG") == "1"
    events = open(events_path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def note(event: str, job: Job, **extra: Any) -> None:
        line = {"event": event, "job": job.job_id, "project": job.project_id, "t": time.time()}
        events.write(json.dumps({**line, "pid": os.getpid(), **extra}) + "\n")
        events.flush()
        os.fsync(events.fileno())

    def train(job: Job) -> dict[str, Any]:
        note("start", job, attempt=job.attempts)
        if hang:
            time.sleep(3600)  # killed here, mid-job
        time.sleep(float(job.trigger.split(":", 1)[1]))

        def write(directory: Path) -> None:
            (directory / "weights.bin").write_bytes(f"{job.project_id}:{job.job_id}".encode() * 64)

        path = config.artifacts_path / f"project-{job.project_id}" / f"job-{job.job_id:04d}"
        digest = write_atomically(path, write)
        note("end", job, sha256=digest)
        return {"path": str(path), "sha256": digest}

    Worker(config, {JOB_TRAIN: train}).run(poll_s=POLL_S)


if __name__ == "__main__":
    main(sys.argv[1])
