"""Scale-out through RQ on a real `redis-server`: the service queues, separate workers train.

`.ci/run` installs Redis (Debian's redis-server) and sets RLHF_REQUIRE_REDIS=1, so in CI a
missing server fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WEBHOOK_HEADERS, free_port, redis_server

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig
from rlhf_core.notify import QUEUE_NAME
from rlhf_core.registry import PROMOTED, REWARD_MODEL
from rlhf_core.store import JOB_DONE, JOB_QUEUED, JOB_TRAIN, Store
from rlhf_core.tiny import ensure_tiny_encoder
from trainer.jobs import registry_for

WORKER_TIMEOUT_S = 1200  # each worker imports torch and transformers: minutes on a busy 2-core box
pytestmark = pytest.mark.timeout(2 * WORKER_TIMEOUT_S + 600)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def queued_tasks(url: str) -> int:
    from redis import Redis

    return int(Redis.from_url(url).llen(f"rq:queue:{QUEUE_NAME}"))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(ensure_tiny_encoder(tmp_path_factory.mktemp("models")))


def start_worker(
    data_dir: Path, redis_url: str, backbone: str, cwd: Path, database_url: str = ""
) -> subprocess.Popen:
    """`rlhf-backend worker --once` as on another machine: its own directory, the shared store."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {
        "RLHF_DATABASE_URL": database_url,
        **os.environ,
        "RLHF_DATA_DIR": str(data_dir),
        "RLHF_REDIS_URL": redis_url,
        "RLHF_REWARD_BACKBONE": backbone,
        "RLHF_REWARD_HEADS": "4",
        "RLHF_POLICY_TRAINING": "off",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # the re-scoring job fails fast: no LS here
        "LABEL_STUDIO_API_KEY": "unused",
        "RLHF_JOB_MAX_ATTEMPTS": "1",
    }
    with open(cwd / "worker.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf_cli.main", "worker", "--once"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_jobs_go_through_redis_to_workers_elsewhere(
    server_factory, redis_url, tiny_backbone, annotation_event, captured, tmp_path
):
    import requests

    server = server_factory(
        env={
            "RLHF_REDIS_URL": redis_url,
            "RLHF_REWARD_BACKBONE": tiny_backbone,
            "RLHF_TRAIN_EVERY": "0",
        }
    )
    setup = captured("01_setup")
    assert requests.post(f"{server.url}/setup", json=setup, timeout=60).status_code == 200
    for i in range(1, 13):
        body = annotation_event(i, task_id=i, selected="left" if i % 3 else "right")
        assert (
            requests.post(
                f"{server.url}/webhook", json=body, headers=WEBHOOK_HEADERS, timeout=60
            ).status_code
            == 200
        )
    # One wake-up so far: for the reconcile job /setup queued (annotations made before it).
    assert queued_tasks(redis_url) == 1
    for _ in range(3):  # a burst of Start Training: one job, and the store coalesces the rest
        answer = requests.post(
            f"{server.url}/webhook", json=captured("08_webhook_start_training"), timeout=60
        )
        assert answer.status_code == 200
    store = server.store()
    [job] = [j for j in store.jobs(1) if j.kind == JOB_TRAIN]
    assert job.status == JOB_QUEUED
    assert queued_tasks(redis_url) == 2  # the service itself runs nothing

    workers = [
        start_worker(server.data_dir, redis_url, tiny_backbone, tmp_path / f"machine-{n}")
        for n in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=WORKER_TIMEOUT_S) == 0
    trained = store.job(job.job_id)
    assert trained.status == JOB_DONE and trained.attempts == 1, trained
    served = registry_for(BackendConfig(data_dir=server.data_dir)).served(1, REWARD_MODEL)
    assert (served.version, served.status) == ("rm-0001", PROMOTED), trained.result
    # The captured /setup names a Label Studio at localhost:8080, which is not there: the
    # promotion's sync waits in the outbox for it.
    [sync] = registry_for(BackendConfig(data_dir=server.data_dir)).pending_syncs(1)
    assert sync.model_version == "rm-0001.policy-base" and sync.error
    assert queued_tasks(redis_url) == 0


def test_an_unreachable_redis_loses_no_job(
    tmp_path, redis_url, captured, tiny_backbone, database_url
):
    """On SQLite the worker shares the data dir; on PostgreSQL it has its own, as on another
    machine: the job reaches it through the database."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    config = BackendConfig(data_dir=tmp_path, redis_url=dead, database_url=database_url)
    client = create_app(config).test_client()
    assert client.post("/setup", json=captured("01_setup")).status_code == 200
    answer = client.post("/webhook", json=captured("08_webhook_start_training"))
    assert answer.status_code == 200 and answer.get_json()["status"] == "queued"
    store = Store(database_url)
    [job] = [j for j in store.jobs(1) if j.kind == JOB_TRAIN]
    assert job.status == JOB_QUEUED
    # Redis is back: a worker starting up runs what the store holds, wake-up or not.
    worker_dir = tmp_path if database_url.startswith("sqlite") else tmp_path / "other-machine"
    worker = start_worker(worker_dir, redis_url, tiny_backbone, tmp_path / "machine", database_url)
    assert worker.wait(timeout=WORKER_TIMEOUT_S) == 0
    finished = store.job(job.job_id)
    assert finished.status == JOB_DONE
    assert finished.result == {"trained": False, "reason": "0 preference pairs; need 2"}
