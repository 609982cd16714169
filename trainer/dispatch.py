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

import logging
import os
import socket
from typing import Any

from rq.job import Job
from rq.serializers import JSONSerializer

from ml_backend.config import BackendConfig

logger = logging.getLogger(__name__)

QUEUE_NAME = "rlhf-jobs"
REDIS_TIMEOUT_S = 2.0  # a webhook must not hang on an unreachable Redis
TASK_TIMEOUT_S = 24 * 3600  # RQ kills a task after this; training can take hours
DRAIN = "trainer.dispatch.drain"


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


def _redis(config: BackendConfig, timeout_s: float | None = REDIS_TIMEOUT_S) -> Any:
    from redis import Redis

    return Redis.from_url(
        config.redis_url, socket_timeout=timeout_s, socket_connect_timeout=REDIS_TIMEOUT_S
    )


def notify_workers(config: BackendConfig, job_id: int | None, why: str) -> None:
    """Wake an RQ worker for a job just queued in the store (no-op without ``RLHF_REDIS_URL``)."""
    if not config.redis_url or job_id is None:
        return
    from redis.exceptions import RedisError
    from rq import Queue

    try:
        Queue(QUEUE_NAME, connection=_redis(config), serializer=JSONSerializer).enqueue(
            DRAIN,
            job_id,
            job_timeout=TASK_TIMEOUT_S,
            description=f"store job {job_id} ({why})",
        )
    except RedisError as exc:
        logger.warning(
            "job %s is queued in the store, but Redis is unreachable (%s): it runs on the next "
            "wake-up or `rlhf-backend worker --once`",
            job_id,
            type(exc).__name__,
        )


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
        connection=_redis(config, None),
        name=name,
        serializer=JSONSerializer,
        job_class=DrainJob,
    )
    worker.work(burst=burst)
