"""Waking the job workers: one RQ message on Redis per job queued in the store.

The store is the queue; Redis only carries a wake-up, :func:`notify_workers`, which the HTTP face
and the commands call after queueing a job (trainer/dispatch.py runs what it wakes). Only the job
id crosses Redis, as JSON, naming ``trainer.dispatch.drain`` as a string: nothing here imports the
jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_core.config import BackendConfig

logger = logging.getLogger(__name__)

QUEUE_NAME = "rlhf-jobs"
REDIS_TIMEOUT_S = 2.0  # a webhook must not hang on an unreachable Redis
TASK_TIMEOUT_S = 24 * 3600  # RQ kills a task after this; training can take hours
DRAIN = "trainer.dispatch.drain"


def redis_connection(config: BackendConfig, timeout_s: float | None = REDIS_TIMEOUT_S) -> Any:
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
    from rq.serializers import JSONSerializer

    try:
        Queue(QUEUE_NAME, connection=redis_connection(config), serializer=JSONSerializer).enqueue(
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
