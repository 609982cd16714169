"""Pinning a version (`rlhf-backend serve-version`), unpinning, and retention of checkpoints.

Every test runs on SQLite and on PostgreSQL (``database_url``)."""

from __future__ import annotations

import json

import pytest

from ml_backend.app import create_app
from rlhf_cli.main import main
from rlhf_core.config import BackendConfig
from rlhf_core.registry import POLICY, PROMOTED, REJECTED, REWARD_MODEL
from rlhf_core.store import JOB_DONE, JOB_TRAIN, Store
from tests.test_training_job import CONFIG, seed_annotations
from trainer.jobs import registry_for, train_job
from trainer.reward_training import GateDecision
from trainer.versions import apply_retention


@pytest.fixture
def config(tmp_path, tiny_backbone, database_url, monkeypatch):
    monkeypatch.setenv("RLHF_DATABASE_URL", database_url)  # for the commands these tests run
    Store(database_url).initialize()
    return BackendConfig(
        data_dir=tmp_path,
        database_url=database_url,
        reward_backbone=tiny_backbone,
        reward_heads=4,
        policy_training="off",
        promotion_tolerance=1.0,  # every retrain is promoted: the tests choose what is served
    )


def train(store: Store, config: BackendConfig) -> dict:
    store.enqueue_training(1, "test")
    job = store.claim_job("test", kinds=(JOB_TRAIN,))
    result = train_job(config, job)
    store.finish_job(job.job_id, JOB_DONE, result=result)
    return result


def serve_version(config: BackendConfig, *args: str) -> int:
    return main(["serve-version", "--project", "1", "--data-dir", str(config.data_dir), *args])


def predicted_version(http) -> str:
    task = {"id": 1, "data": {"prompt": "q", "answer1": "thank you", "answer2": "go away"}}
    body = {"project": "1.1", "label_config": CONFIG, "tasks": [task]}
    return http.post("/predict", json=body).get_json()["results"][0][0]["model_version"]


def label_studio_syncs(config: BackendConfig) -> list[str]:
    """The versions Label Studio is still to be shown (no Label Studio in these tests: the
    outbox keeps the newest)."""
    return [s.model_version for s in registry_for(config).pending_syncs(1)]


def test_pin_serves_an_earlier_version_and_unpin_returns(config, capsys):
    store = Store(config.resolved_database_url).initialize()
    seed_annotations(store, 40)
    http = create_app(config).test_client()
    train(store, config)
    train(store, config)
    assert predicted_version(http) == "rm-0002.policy-base"

    assert serve_version(config, "--version", "rm-0001", "--reason", "rm-0002 misranks") == 0
    state = json.loads(capsys.readouterr().out)
    assert state["served"] == "rm-0001.policy-base"
    assert state["pinned"] == {"rm": {"version": "rm-0001", "reason": "rm-0002 misranks"}}
    assert predicted_version(http) == "rm-0001.policy-base"
    # Label Studio follows through the promotion path: a sync of the served version.
    assert label_studio_syncs(config) == ["rm-0001.policy-base"]
    metrics = http.get("/metrics").get_data(as_text=True)
    assert (
        'rlhf_model_pinned_info{kind="rm",model_version="rm-0001",project="1",'
        'reason="rm-0002 misranks"} 1.0' in metrics
    )
    disk = registry_for(config).disk_usage(1)
    [line] = [x for x in metrics.splitlines() if x.startswith("rlhf_model_artifacts_bytes{")]
    assert line.startswith('rlhf_model_artifacts_bytes{project="1"}')
    assert disk > 0 and float(line.split()[-1]) == disk

    # A promotion while pinned is recorded, but the pin still serves.
    result = train(store, config)
    assert result["promoted"] and result["version"] == "rm-0003"
    assert predicted_version(http) == "rm-0001.policy-base"
    assert label_studio_syncs(config) == ["rm-0001.policy-base"]

    assert serve_version(config, "--unpin") == 0
    assert json.loads(capsys.readouterr().out)["unpinned"] == ["rm-0001"]
    assert predicted_version(http) == "rm-0003.policy-base"
    assert "rlhf_model_pinned_info{" not in http.get("/metrics").get_data(as_text=True)
    assert label_studio_syncs(config) == ["rm-0003.policy-base"]


def test_a_rejected_version_can_be_pinned(config, monkeypatch):
    store = Store(config.resolved_database_url).initialize()
    seed_annotations(store, 40)
    train(store, config)
    import trainer.jobs as jobs

    rejected = GateDecision(False, "worse: test", {})  # this test is about pinning, not the gate
    monkeypatch.setattr(jobs, "should_promote", lambda *args, **kwargs: rejected)
    train(store, config)
    registry = registry_for(config)
    assert registry.get(1, REWARD_MODEL, "rm-0002").status == REJECTED

    assert serve_version(config, "--version", "rm-0002", "--reason", "override the gate") == 0
    assert registry.served_version(1) == "rm-0002.policy-base"
    assert registry.get(1, REWARD_MODEL, "rm-0002").status == REJECTED  # its history is kept
    assert serve_version(config, "--version", "rm-untrained", "--reason", "back to zero") == 0
    assert registry.served_version(1) == "rm-untrained.policy-base"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "rm-0009", "--reason", "x"], "no rm-0009"),
        (["--version", "rm-0001"], "say why (--reason)"),
        (["--version", "bogus", "--reason", "x"], "is not a version"),
        (["--version", "rm-0001", "--unpin", "--reason", "x"], "not both"),
    ],
)
def test_bad_pins_are_refused(config, capsys, args, message):
    store = Store(config.resolved_database_url).initialize()
    seed_annotations(store, 20)
    train(store, config)
    assert serve_version(config, *args) == 2
    assert message in capsys.readouterr().err
    assert registry_for(config).pins(1) == {}


def fake_versions(registry, kind: str, statuses: list[str]) -> list:
    """Versions of ``kind`` with checkpoint directories, as a training job leaves them."""
    for status in statuses:
        version, path = registry.new_version_dir(1, kind)
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "weights.bin").write_bytes(b"x" * 1000)
        registry.record(1, kind, version, path, {}, {}, {}, status, "test")
    return registry.versions(1, kind)


def test_retention_deletes_exactly_the_unprotected_checkpoints(config):
    registry = registry_for(config)
    p, r = PROMOTED, REJECTED
    rms = fake_versions(registry, REWARD_MODEL, [p, r, p, p, r, r, r, r])
    policies = fake_versions(registry, POLICY, [p, r, r])
    registry.pin(1, REWARD_MODEL, "rm-0002", "rollback")  # a rejected version, pinned

    pruned = apply_retention(registry, 1, keep=3)

    # rm: the newest 3 (6-8), the pinned (2), the last promoted (4, where --unpin returns).
    assert sorted(p.version for p in pruned) == ["rm-0001", "rm-0003", "rm-0005"]
    kept = {v.version for v in rms if v.path.exists()}
    assert kept == {"rm-0002", "rm-0004", "rm-0006", "rm-0007", "rm-0008"}
    assert all(v.path.exists() for v in policies)  # 3 versions: all among the newest 3
    assert len(registry.versions(1)) == 11  # rows are kept
    assert registry.disk_usage(1) == 8 * 1002
    assert apply_retention(registry, 1, keep=0) == []  # 0: keep everything


def test_a_pruned_version_cannot_be_pinned(config, capsys):
    store = Store(config.resolved_database_url).initialize()
    store.upsert_project(1, CONFIG)
    registry = registry_for(config)
    fake_versions(registry, REWARD_MODEL, [PROMOTED] * 3)
    apply_retention(registry, 1, keep=1)
    assert serve_version(config, "--version", "rm-0001", "--reason", "x") == 2
    assert "deleted by retention" in capsys.readouterr().err


def test_training_applies_retention_after_a_promotion(config, tiny_backbone, tmp_path):
    config = BackendConfig(
        data_dir=tmp_path,
        reward_backbone=tiny_backbone,
        reward_heads=4,
        policy_training="off",
        promotion_tolerance=1.0,
        keep_versions=1,
    )
    store = Store(config.resolved_database_url).initialize()
    seed_annotations(store, 20)
    train(store, config)
    train(store, config)
    result = train(store, config)
    registry = registry_for(config)
    assert result["pruned"] == ["rm-0002"]  # rm-0001 went after the second promotion
    assert [v.path.exists() for v in registry.versions(1, REWARD_MODEL)] == [False, False, True]
