"""The learning loop end to end against a fake Label Studio (a real HTTP server on loopback):
reconcile from Label Studio's API, atomic promotion with its outbox, and a crash at every phase.
Every test runs on SQLite and on PostgreSQL (``config_for``)."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest
from fake_label_studio import FakeLabelStudio
from test_policy_training import one_torch_thread  # noqa: F401 (autouse: one thread)
from test_training_job import CONFIG, polite_task

import rlhf_core.registry as registry_module
import trainer.jobs as jobs
from ml_backend.app import create_app
from rlhf_cli.main import main
from rlhf_core.config import BackendConfig
from rlhf_core.credentials import Connection, Credentials
from rlhf_core.label_studio import LabelStudioTasks, client
from rlhf_core.store import JOB_RECONCILE, Store
from rlhf_core.tiny import ensure_tiny_encoder
from rlhf_core.vault import Vault
from trainer.label_studio_sync import drain_syncs
from trainer.reconcile import reconcile_project
from trainer.reward_training import Progress
from trainer.worker import Worker, default_chores, default_handlers

TOKEN = "test-token-not-a-secret"


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return str(ensure_tiny_encoder(tmp_path_factory.mktemp("models")))


@pytest.fixture
def ls():
    with FakeLabelStudio(projects=[1]) as fake:
        yield fake


def annotation(annotation_id: int, task_id: int, side: str, stamp: str = "10:00:00") -> dict:
    return {
        "id": annotation_id,
        "task": task_id,
        "project": 1,
        "completed_by": 7,
        "was_cancelled": False,
        "created_at": "2026-11-01T09:00:00Z",
        "updated_at": f"2026-11-01T{stamp}Z",
        "result": [
            {
                "from_name": "comparison",
                "to_name": "answer1",
                "type": "pairwise",
                "value": {"selected": side},
            }
        ],
    }


def label_in_label_studio(ls: FakeLabelStudio, n: int, seed: int = 0) -> None:
    """n tasks annotated in Label Studio (annotators prefer the polite answer)."""
    rng = random.Random(seed)
    for i in range(1, n + 1):
        data, side = polite_task(i, rng)
        ls.add_task(i, 1, data)
        ls.annotate(i, annotation(100 + i, i, side))


def connected_store(config: BackendConfig, ls: FakeLabelStudio) -> Store:
    store = Store(config.resolved_database_url).initialize()
    connect(config, store, 1, ls)
    return store


def connect(config: BackendConfig, store: Store, project_id: int, ls: FakeLabelStudio) -> None:
    """What /setup does: the project's config, and its Label Studio with a token for it."""
    Credentials(config, store, Vault.for_config(config)).connect(project_id, CONFIG, ls.url, TOKEN)


@pytest.fixture
def config_for(tmp_path, database_url, monkeypatch):
    """``config_for(**settings)``: a config on this test's database (SQLite, then PostgreSQL),
    which the commands the test runs read from the environment too."""
    monkeypatch.setenv("RLHF_DATABASE_URL", database_url)

    def config(**settings) -> BackendConfig:
        return BackendConfig(data_dir=tmp_path, database_url=database_url, **settings)

    return config


# -- reconcile -------------------------------------------------------------------------------


def test_reconcile_adds_updates_removes_and_is_idempotent(tmp_path, ls, config_for):
    label_in_label_studio(ls, 5)
    config = config_for()
    store = connected_store(config, ls)
    tasks = LabelStudioTasks(client(Connection(ls.url, TOKEN)), page_size=2)  # three pages

    assert reconcile_project(store, 1, tasks).as_dict() == {"added": 5, "updated": 0, "removed": 0}
    assert sorted(r["annotation"] for r in store.records(1)) == [101, 102, 103, 104, 105]
    assert reconcile_project(store, 1, tasks).as_dict() == {"added": 0, "updated": 0, "removed": 0}

    before = next(r for r in store.records(1) if r["annotation"] == 102)
    flipped = "left" if before["chosen"] == ls.tasks[2]["data"]["answer2"] else "right"
    ls.annotate(2, annotation(102, 2, flipped, stamp="11:00:00"))  # edited in Label Studio
    ls.delete_annotation(3, 103)  # deleted there
    ls.add_task(6, 1, dict(ls.tasks[1]["data"], prompt="question 6"))
    ls.annotate(6, annotation(106, 6, "left"))
    assert reconcile_project(store, 1, tasks).as_dict() == {"added": 1, "updated": 1, "removed": 1}
    after = next(r for r in store.records(1) if r["annotation"] == 102)
    assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
    assert sorted(r["annotation"] for r in store.records(1)) == [101, 102, 104, 105, 106]
    assert reconcile_project(store, 1, tasks).as_dict() == {"added": 0, "updated": 0, "removed": 0}


def test_reconcile_removes_nothing_when_label_studio_cannot_be_read(tmp_path, ls, config_for):
    label_in_label_studio(ls, 3)
    config = config_for()
    store = connected_store(config, ls)
    tasks = LabelStudioTasks(client(Connection(ls.url, TOKEN)))
    reconcile_project(store, 1, tasks)
    ls.down = True
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a 503
        reconcile_project(store, 1, tasks)
    assert len(store.records(1)) == 3


def test_reconcile_command_prints_the_counts_as_its_last_line(tmp_path, ls, config_for, capsys):
    label_in_label_studio(ls, 4)
    connected_store(config_for(), ls)
    argv = ["reconcile", "--project", "1", "--data-dir", str(tmp_path)]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"added": 4, "updated": 0, "removed": 0}
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "added": 0,
        "updated": 0,
        "removed": 0,
    }


def test_setup_queues_a_reconcile_that_a_worker_runs(tmp_path, ls, config_for):
    label_in_label_studio(ls, 3)  # annotated before the backend was connected
    config = config_for(train_every=0)
    http = create_app(config).test_client()
    body = {"project": "1.1", "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN}
    assert http.post("/setup", json=body).status_code == 200
    store = Store(config.resolved_database_url)
    assert [(j.kind, j.status) for j in store.jobs(1)] == [(JOB_RECONCILE, "queued")]
    assert Worker(config, default_handlers(config)).run(once=True) == 1
    [job] = store.jobs(1)
    assert job.result == {"added": 3, "updated": 0, "removed": 0}
    assert len(store.records(1)) == 3
    # Label Studio calls /setup before every batch of predictions: not a reconcile each time.
    assert http.post("/setup", json=body).status_code == 200
    assert len(store.jobs(1)) == 1


# -- atomic promotion, the outbox, and a crash at every phase ---------------------------------


@pytest.fixture
def loop_config(config_for, tiny_backbone):
    return config_for(
        reward_backbone=tiny_backbone,
        reward_heads=4,
        max_new_tokens=6,
        num_candidates=2,
        train_every=0,
    )


def served_everywhere(config: BackendConfig, ls: FakeLabelStudio) -> dict[str, str]:
    """The version each party believes is served."""
    http = create_app(config).test_client()
    task = {"id": 1, "data": ls.tasks[1]["data"]}
    [[prediction]] = http.post(
        "/predict", json={"project": "1.1", "label_config": CONFIG, "tasks": [task]}
    ).get_json()["results"]
    return {
        "predict": prediction["model_version"],
        "registry": jobs.registry_for(config).served_version(1),
        "label_studio": ls.model_version(1),
    }


PHASES = [
    "reward model trained",
    "reward model recorded",
    "inside policy training",
    "policy recorded",
    "promoted",
    "label studio sync",
]


@pytest.mark.parametrize("phase", PHASES)
def test_a_crash_at_any_phase_then_a_retry_leaves_everyone_agreeing(
    phase, loop_config, ls, monkeypatch
):
    config = loop_config
    monkeypatch.setattr(registry_module, "SYNC_RETRY_DELAYS_S", (0.0,))
    label_in_label_studio(ls, 24)
    store = connected_store(config, ls)
    reconcile_project(store, 1, LabelStudioTasks(client(Connection(ls.url, TOKEN))))
    labels = sorted(json.dumps(r, sort_keys=True) for r in store.records(1))
    fault = _inject(phase, ls, monkeypatch)

    store.enqueue_training(1, "test")
    Worker(config, default_handlers(config)).run_job(store.claim_job("crashing worker"))
    registry = jobs.registry_for(config)
    served = registry.served_version(1)
    if served == "rm-untrained.policy-base":  # crashed before the promotion: nothing changed
        assert ls.model_version(1) == "" and registry.pending_syncs(1) == []
    else:  # crashed after it: the promotion is whole and its sync is waiting
        assert served.startswith("rm-0001.")
        assert [s.model_version for s in registry.pending_syncs(1)] == [served]
    assert fault["fired"]

    ls.down = False  # Label Studio is back; a worker restarts and retries
    Worker(config, default_handlers(config), default_chores(config)).run(once=True)

    agreed = served_everywhere(config, ls)
    assert len(set(agreed.values())) == 1, agreed
    assert agreed["registry"].startswith("rm-0001."), agreed  # one promotion, not one per try
    assert registry.pending_syncs(1) == []
    assert store.project(1).model_version == agreed["registry"]
    assert sorted(json.dumps(r, sort_keys=True) for r in store.records(1)) == labels
    assert [j.status for j in store.jobs(1)] == ["done"]


def _inject(phase: str, ls: FakeLabelStudio, monkeypatch: pytest.MonkeyPatch) -> dict:
    fault = {"fired": False}

    def fire() -> None:
        if not fault["fired"]:
            fault["fired"] = True
            raise RuntimeError(f"killed at {phase} (simulated)")

    if phase == "label studio sync":
        ls.down = True  # the promotion commits; Label Studio cannot be told
        fault["fired"] = True
    elif phase == "inside policy training":
        real = jobs.job_progress

        def progress(store, job, name, every_s=1.0):
            inner = real(store, job, name, every_s)
            if name != "policy":
                return inner

            def report(state):
                fire()
                inner.report(state)

            return Progress(inner.label, report)

        monkeypatch.setattr(jobs, "job_progress", progress)
    else:
        real_reached = jobs.reached
        monkeypatch.setattr(jobs, "reached", lambda p: fire() if p == phase else real_reached(p))
    return fault


def test_status_shows_served_shown_and_pending_until_the_sync_is_confirmed(
    loop_config, ls, capsys, monkeypatch
):
    config = loop_config
    monkeypatch.setattr(registry_module, "SYNC_RETRY_DELAYS_S", (0.0,))
    label_in_label_studio(ls, 3)
    connected_store(config, ls)
    registry = jobs.registry_for(config)
    registry.queue_sync(1)  # e.g. a promotion whose sync has not run yet
    argv = ["status", "--project", "1", "--data-dir", str(config.data_dir)]

    assert main(argv) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["served"] == "rm-untrained.policy-base" and status["label_studio"] is None
    assert not status["in_sync"]
    assert [s["model_version"] for s in status["pending_syncs"]] == [status["served"]]

    ls.down = True
    [failed] = drain_syncs(config, registry)
    assert not failed["done"] and failed["error"]
    [pending] = registry.pending_syncs(1)
    assert pending.attempts == 1 and pending.error == failed["error"]  # kept, to be retried
    ls.down = False
    [done] = drain_syncs(config, registry)
    assert done["done"] and done["predicted"] == 0  # every task is labelled: nothing to score
    assert ls.model_version(1) == "rm-untrained.policy-base"

    assert main(argv) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["in_sync"] and status["pending_syncs"] == []


def test_workers_queue_a_reconcile_of_every_project_on_schedule(tmp_path, ls, config_for):
    config = config_for(reconcile_every_s=0.01)
    store = connected_store(config, ls)
    connect(config, store, 2, ls)
    chores = default_chores(config)
    time.sleep(0.05)
    for chore in chores:
        chore()
    assert sorted((j.project_id, j.kind, j.trigger) for j in store.jobs()) == [
        (1, JOB_RECONCILE, "schedule"),
        (2, JOB_RECONCILE, "schedule"),
    ]
    off = default_chores(dataclasses.replace(config, reconcile_every_s=0.0))
    for chore in off:
        chore()
    assert len(store.jobs()) == 2
