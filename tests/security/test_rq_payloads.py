"""Attack 4: whoever can write to Redis must not run code on the workers.

RQ pickles job payloads by default, so a worker would unpickle (and run) whatever is queued.
Against a real ``redis-server``: the backend's wake-ups are JSON carrying only a job id, and the
worker runs nothing else, pickled or JSON. Also: a Redis URL with a password works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import redis_server

from rlhf_core.config import BackendConfig
from rlhf_core.notify import QUEUE_NAME, notify_workers

PASSWORD = "redis-pass-0123456789"
WORKER_TIMEOUT_S = 600
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback that requires a password."""
    with redis_server(tmp_path_factory.mktemp("redis"), password=PASSWORD) as url:
        yield url


@pytest.fixture
def redis(redis_url):
    from redis import Redis

    connection = Redis.from_url(redis_url)
    connection.flushdb()
    return connection


def run_worker(data_dir: Path, redis_url: str) -> subprocess.CompletedProcess:
    """`rlhf-backend worker --once` (an RQ worker in burst mode) on the shared store."""
    env = {**os.environ, "RLHF_DATA_DIR": str(data_dir), "RLHF_REDIS_URL": redis_url}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [sys.executable, "-m", "rlhf_cli.main", "worker", "--once"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)


def test_a_pickled_job_written_to_redis_does_not_run(tmp_path, redis, redis_url):
    from rq import Queue

    marker = tmp_path / "pwned-by-pickle"
    Queue(QUEUE_NAME, connection=redis).enqueue("os.mkdir", str(marker))  # RQ's default: pickle

    done = run_worker(tmp_path / "data", redis_url)

    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert redis.llen(f"rq:queue:{QUEUE_NAME}") == 0  # taken off the queue, failed


def test_a_json_job_naming_another_function_does_not_run(tmp_path, redis, redis_url):
    from rq import Queue
    from rq.serializers import JSONSerializer

    marker = tmp_path / "pwned-by-json"
    queue = Queue(QUEUE_NAME, connection=redis, serializer=JSONSerializer)
    queue.enqueue("os.mkdir", str(marker))
    queue.enqueue("trainer.dispatch.drain", "not-a-job-id")

    done = run_worker(tmp_path / "data", redis_url)

    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert "RefusedJob" in done.stderr


def test_wake_ups_carry_only_a_job_id_as_json(tmp_path, redis, redis_url):
    config = BackendConfig(data_dir=tmp_path, redis_url=redis_url)
    notify_workers(config, 42, "test")
    [rq_id] = redis.lrange(f"rq:queue:{QUEUE_NAME}", 0, -1)
    data = redis.hget(f"rq:job:{rq_id.decode()}", "data")
    assert json.loads(zlib.decompress(data)) == ["trainer.dispatch.drain", None, [42], {}]

    done = run_worker(tmp_path, redis_url)  # with the password from the URL

    assert done.returncode == 0, done.stderr[-3000:]
    assert redis.llen(f"rq:queue:{QUEUE_NAME}") == 0
    assert PASSWORD not in done.stderr  # never logged
