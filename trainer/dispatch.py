"""Scale-out: RQ on Redis carries jobs to `rlhf-backend worker` processes on other machines.

The store stays the one durable queue: a job is a row there before anything else happens, with
its coalescing, one-job-per-project rule, retries and stale recovery. Redis only carries a
*wake-up*: each queued job pushes one RQ task, :func:`drain`, and whichever RQ worker picks it up
claims and runs every job the store has ready, exactly as a polling worker would. So a lost
message (Redis down for a moment) loses no job: the next wake-up or ``rlhf-backend worker --once``
runs it, and two wake-ups for one job run it once.

Workers on other machines reach the same store and model registry through the database
(``RLHF_DATABASE_URL``, PostgreSQL) and the checkpoints through a shared ``RLHF_ARTIFACT_DIR``.

Only a job id crosses Redis, as JSON: RQ's default serializer is pickle, which would let anyone
who can write to Redis run code on the workers. The workers read JSON only and run nothing but
:func:`drain` with an integer argument (:class:`DrainJob`); anything else in the queue fails.
Put a password in the URL (``redis://:PASSWORD@host:6379/0``) when Redis is reachable by others.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from rq.job import Job
from rq.serializers import JSONSerializer

from rlhf_core.config import BackendConfig
from rlhf_core.notify import DRAIN, QUEUE_NAME, redis_connection


class RefusedJob(Exception):
    """A queued RQ job that is not ``drain(<job id>)``: someone else wrote to our queue."""


class DrainJob(Job):
    """An RQ job that can only be :func:`drain` of one store job id; callbacks never run."""

    @property
    def func(self) -> Any:
        args, kwargs = self.args, self.kwargs
        plain_id = len(args) == 1 and type(args[0]) is int
        if self.func_name != DRAIN or self.instance is not None or kwargs or not plain_id:
            raise RefusedJob(f"refused RQ job {self.id}: this queue runs only {DRAIN}(<job id>)")
        return drain

    success_callback = failure_callback = stopped_callback = property(lambda self: None)


def drain(job_id: int | None = None) -> int:
    """The RQ task: run every job the store has ready (``job_id``, the one that woke us, among
    them), with this machine's configuration."""
    from trainer.worker import Worker, default_chores, default_handlers

    config = BackendConfig.from_env()
    return Worker(config, default_handlers(config), default_chores(config)).run(once=True)


def run_rq_worker(config: BackendConfig, burst: bool = False) -> None:
    """An RQ worker on ``QUEUE_NAME`` (``burst``: stop when the queue is empty)."""
    from rq import Worker

    # RQ runs each task in a forked child that reads its configuration from the environment.
    os.environ["RLHF_DATA_DIR"] = str(config.data_dir)
    drain()  # the store may hold jobs queued while no worker listened
    name = f"rlhf-{socket.gethostname()}-{os.getpid()}"
    # No socket timeout: the worker blocks on Redis until a task arrives.
    worker = Worker(
        [QUEUE_NAME],
        connection=redis_connection(config, None),
        name=name,
        serializer=JSONSerializer,
        job_class=DrainJob,
    )
    worker.work(burst=burst)
