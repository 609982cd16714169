"""The training job end to end on a real store: records -> trained heads -> promoted version."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable

import pytest

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig
from rlhf_core.registry import PROMOTED, REJECTED, REWARD_MODEL
from rlhf_core.store import JOB_DONE, IncomingAnnotation, Store
from rlhf_core.tiny import ensure_tiny_encoder
from trainer.jobs import registry_for, train_job
from trainer.reward_training import RewardTrainingConfig, is_heldout
from trainer.worker import Worker

CONFIG = """<View><Text name="prompt" value="$prompt"/>
<Pairwise name="comparison" toName="answer1,answer2"/>
<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>"""


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return str(ensure_tiny_encoder(tmp_path_factory.mktemp("models")))


@pytest.fixture
def config(tmp_path, tiny_backbone):
    # Policy training has its own tests (test_policy_training.py); here it would only add time.
    return BackendConfig(
        data_dir=tmp_path, reward_backbone=tiny_backbone, reward_heads=4, policy_training="off"
    )


def polite_task(i: int, rng: random.Random) -> tuple[dict[str, str], str]:
    """Task data with a polite and a rude answer, and the side the polite one is on."""
    polite, rude = f"thank you, here is step {i}", f"go away {i}, no"
    left = rng.random() < 0.5
    data = {
        "prompt": f"question {i}",
        "answer1": polite if left else rude,
        "answer2": rude if left else polite,
    }
    return data, "left" if left else "right"


def seed_annotations(store: Store, n: int, seed: int = 0) -> None:
    """Annotators prefer the polite answer (a rule the model can pick up)."""
    rng = random.Random(seed)
    store.upsert_project(1, CONFIG)
    from rlhf_core.conversion import Provenance, convert
    from rlhf_core.label_schema import parse_label_config

    schema = parse_label_config(CONFIG)
    for i in range(n):
        data, side = polite_task(i, rng)
        result = [
            {
                "from_name": "comparison",
                "to_name": "answer1",
                "type": "pairwise",
                "value": {"selected": side},
            }
        ]
        incoming = IncomingAnnotation(i + 1, 1, i + 1, 7, data, result, False, "t", CONFIG)
        store.upsert_annotation(
            incoming, convert(result, data, schema, Provenance(1, i + 1, i + 1, 7))
        )


def test_train_job_promotes_a_trained_version_with_its_evidence_and_queues_its_sync(config):
    store = Store(config.db_path).initialize()
    seed_annotations(store, 60)
    store.enqueue_training(1, "test")
    result = train_job(config, store.claim_job("test"))
    assert result["trained"] and result["promoted"], result
    registry = registry_for(config)
    served = registry.served(1, REWARD_MODEL)
    assert served.version == "rm-0001" and served.status == PROMOTED
    assert served.metrics["train_pairs"] > 0
    gate = served.metrics["gate"]
    assert gate["rule"].startswith("in-sample") and gate["n"] == 60  # 60 pairs, few held out
    assert gate["ci_low"] <= gate["difference"] <= gate["ci_high"]
    assert "held-out pairs count from 30 on" in served.reason
    assert (served.path / "config.json").is_file()
    saved = json.loads((served.path / "config.json").read_text())
    assert saved["provenance"]["trained"] is True
    assert saved["provenance"]["version"] == "rm-0001"
    assert registry.served_version(1) == "rm-0001.policy-base"
    # The project was never connected to a Label Studio: the sync waits in the outbox.
    [sync] = registry.pending_syncs(1)
    assert sync.model_version == "rm-0001.policy-base" and "URL/token" in sync.error
    metrics = create_app(config).test_client().get("/metrics").get_data(as_text=True)
    labels = 'kind="rm",project="1",rule="in-sample (held-out below minimum)",version="rm-0001"'
    assert f"rlhf_gate_n{{{labels}}} 60.0" in metrics
    assert f"rlhf_gate_passed{{{labels}}} 1.0" in metrics
    assert f"rlhf_gate_ci_low{{{labels}}}" in metrics
    assert 'rlhf_label_studio_syncs_pending{project="1"} 1.0' in metrics


def test_served_predictions_carry_the_promoted_version(config):
    store = Store(config.db_path).initialize()
    seed_annotations(store, 40)
    app = create_app(config)
    http = app.test_client()
    task = {"id": 1, "data": {"prompt": "q", "answer1": "thank you", "answer2": "go away"}}
    body = {"project": "1.1", "label_config": CONFIG, "tasks": [task]}
    before = http.post("/predict", json=body).get_json()["results"][0][0]
    assert before["model_version"] == "rm-untrained.policy-base"
    store.enqueue_training(1, "test")
    train_job(config, store.claim_job("test"))
    after = http.post("/predict", json=body).get_json()["results"][0][0]
    assert after["model_version"] == "rm-0001.policy-base"
    assert http.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json() == {
        "model_version": "rm-0001.policy-base"
    }


def relabel(store: Store, flip: Callable[[str], bool], stamp: str = "u") -> None:
    """Annotators change their minds on the tasks where ``flip(group)``: the rude answer wins."""
    from rlhf_core.conversion import Provenance, convert
    from rlhf_core.label_schema import parse_label_config

    schema = parse_label_config(CONFIG)
    for stored in store.annotations(1):
        if not flip(f"1:{stored.task_id}"):
            continue
        side = stored.result[0]["value"]["selected"]
        result = [dict(stored.result[0], value={"selected": "right" if side == "left" else "left"})]
        incoming = IncomingAnnotation(
            stored.annotation_id,
            1,
            stored.task_id,
            7,
            stored.task_data,
            result,
            False,
            stamp,
            CONFIG,
        )
        provenance = Provenance(1, stored.task_id, stored.annotation_id, 7)
        store.upsert_annotation(incoming, convert(result, stored.task_data, schema, provenance))


def train_once(config: BackendConfig, store: Store) -> dict:
    """One training job, run as a worker runs it (finished, so the next one can be claimed)."""
    store.enqueue_training(1, "test")
    job = store.claim_job("test")
    result = train_job(config, job)
    store.finish_job(job.job_id, JOB_DONE, result=result)
    return result


def test_the_real_gate_rejects_a_genuinely_worse_reward_model(config):
    """Training labels are reversed (a confused annotator; held-out ones stay true): the model
    learns the wrong rule, is worse on held-out pairs than what is served, and the unmodified
    gate says so with its interval."""
    config = dataclasses.replace(config, min_heldout_pairs=12)
    store = Store(config.db_path).initialize()
    seed_annotations(store, 160)
    relabel(store, lambda group: not is_heldout(group, RewardTrainingConfig().heldout_fraction))
    result = train_once(config, store)
    assert result["promoted"] is False, result["reason"]
    registry = registry_for(config)
    assert registry.served_version(1) == "rm-untrained.policy-base"
    rejected = registry.get(1, REWARD_MODEL, "rm-0001")
    gate = rejected.metrics["gate"]
    assert rejected.status == REJECTED and gate["rule"] == "held-out non-inferiority"
    assert gate["n"] >= 12 and gate["ci_high"] < 0, gate
    assert "held-out non-inferiority" in rejected.reason
    assert registry.pending_syncs(1) == []  # nothing promoted, nothing to tell Label Studio


def test_the_same_labels_pass_the_held_out_gate(config):
    config = dataclasses.replace(config, min_heldout_pairs=12)
    store = Store(config.db_path).initialize()
    seed_annotations(store, 160)
    for _ in range(2):
        result = train_once(config, store)
    assert result["promoted"], result["reason"]
    gate = registry_for(config).get(1, REWARD_MODEL, "rm-0002").metrics["gate"]
    assert gate["rule"] == "held-out non-inferiority" and gate["n"] >= 12


def test_the_configured_promotion_tolerance_is_the_gates(config):
    store = Store(config.db_path).initialize()
    seed_annotations(store, 20)
    store.enqueue_training(1, "test")
    train_job(dataclasses.replace(config, promotion_tolerance=0.25), store.claim_job("test"))
    version = registry_for(config).get(1, REWARD_MODEL, "rm-0001")
    assert version.metrics["gate"]["tolerance"] == 0.25 and "-0.25" in version.reason


def test_a_crashing_job_changes_nothing_and_is_retried_then_failed(config, monkeypatch):
    store = Store(config.db_path).initialize()
    seed_annotations(store, 10)
    before = store.records(1)
    calls = []

    def crash(job):
        calls.append(job.attempts)
        raise RuntimeError("out of memory (simulated)")

    worker = Worker(config, {"train": crash})
    store.enqueue_training(1, "test")
    assert worker.run(once=True) == config.job_max_attempts
    [job] = store.jobs(1)
    assert job.status == "failed" and "out of memory" in job.error
    assert calls == [1, 2, 3]
    assert store.records(1) == before
    assert registry_for(config).served_version(1) == "rm-untrained.policy-base"


def test_worker_runs_queued_jobs(config):
    store = Store(config.db_path).initialize()
    seed_annotations(store, 30)
    store.enqueue_training(1, "test")
    worker = Worker(config, {"train": lambda job: train_job(config, job)})
    assert worker.run(once=True) == 1
    assert store.jobs(1)[0].status == JOB_DONE


RANKING_CONFIG = """<View><Text name="prompt" value="$prompt"/>
<List name="candidates" value="$candidates" title="Candidates"/>
<Ranker name="rank" toName="candidates"/></View>"""


def test_rankings_are_trained_on_as_their_pairs_at_most_the_bound_per_ranking(tmp_path, config):
    from dataclasses import replace

    from rlhf_core.conversion import Provenance, convert
    from rlhf_core.label_schema import parse_label_config

    config = replace(config, max_ranking_pairs=20)
    store = Store(config.db_path).initialize()
    store.upsert_project(1, RANKING_CONFIG)
    schema = parse_label_config(RANKING_CONFIG)
    for i in range(6):  # 10 items: 45 implied pairs each, 20 of them trained on
        items = [{"id": f"c{k}", "body": f"answer {k} to {i}"} for k in range(10)]
        data = {"prompt": f"question {i}", "candidates": items}
        result = [
            {"from_name": "rank", "type": "ranker", "value": {"ranker": [it["id"] for it in items]}}
        ]
        incoming = IncomingAnnotation(i + 1, 1, i + 1, 7, data, result, False, "t", RANKING_CONFIG)
        store.upsert_annotation(
            incoming, convert(result, data, schema, Provenance(1, i + 1, i + 1, 7))
        )
    store.enqueue_training(1, "test")

    result = train_job(config, store.claim_job("test"))

    assert len(store.records(1)) == 6  # one ranking record per annotation
    served = registry_for(config).served(1, REWARD_MODEL)
    assert result["trained"], result
    assert served.data_snapshot["records"] == 6 * 20
