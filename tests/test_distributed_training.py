"""``accelerate launch`` runs one training job over several processes (gloo on this CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_job import seed_annotations

from rlhf_core.config import BackendConfig
from rlhf_core.registry import POLICY, REWARD_MODEL
from rlhf_core.store import JOB_DONE, JOB_TRAIN, Store
from rlhf_core.tiny import ensure_tiny_encoder
from trainer.jobs import registry_for

pytestmark = pytest.mark.slow

PROCESSES = 2


def accelerate_launch(
    data_dir: Path, backbone: str, *cli: str, **settings: str
) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    argv = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(PROCESSES)]
    argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += ["-m", "rlhf_cli.main", *cli, "--data-dir", str(data_dir)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RLHF_REWARD_BACKBONE": backbone,
        "RLHF_REWARD_HEADS": "4",
        "RLHF_MAX_NEW_TOKENS": "8",
        **settings,
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def test_accelerate_launch_trains_the_policy_data_parallel_and_records_once(tmp_path):
    backbone = str(ensure_tiny_encoder(tmp_path / "models"))
    config = BackendConfig(data_dir=tmp_path / "data", reward_backbone=backbone, reward_heads=4)
    store = Store(config.db_path).initialize()
    seed_annotations(store, 40)

    run = accelerate_launch(config.data_dir, backbone, "train", "--project", "1")
    assert run.returncode == 0, run.stderr[-4000:]
    outcome = json.loads(run.stdout[run.stdout.index("{") :])
    assert outcome["status"] == JOB_DONE, outcome
    [train] = [j for j in store.jobs(1) if j.kind == JOB_TRAIN]
    assert train.status == JOB_DONE and train.job_id == outcome["job"]
    # Rank 0 alone promoted, so one Label Studio sync (re-scoring) is queued, not one per rank.
    registry = registry_for(config)
    [sync] = registry.pending_syncs(1)
    assert sync.model_version == registry.served_version(1)

    # Rank 0 alone recorded: one reward model, one policy, and the policy trained on 2 ranks.
    assert [v.version for v in registry.versions(1, REWARD_MODEL)] == ["rm-0001"]
    [policy] = registry.versions(1, POLICY)
    metrics = policy.metrics
    assert metrics["processes"] == PROCESSES and metrics["judge"] == "rm-0001"
    # Each rank saw its shard: steps per epoch as DDP counts them, half the one-process count.
    pairs, batch, epochs = metrics["dpo_pairs"], 8, 2
    assert metrics["dpo"]["steps"] == math.ceil(math.ceil(pairs / PROCESSES) / batch) * epochs
    assert metrics["dpo"]["steps"] < math.ceil(pairs / batch) * epochs


def test_grpo_runs_over_processes_too(tmp_path):
    backbone = str(ensure_tiny_encoder(tmp_path / "models"))
    config = BackendConfig(data_dir=tmp_path / "data", reward_backbone=backbone, reward_heads=4)
    seed_annotations(Store(config.db_path).initialize(), 24)
    run = accelerate_launch(
        config.data_dir, backbone, "train", "--project", "1", RLHF_POLICY_TRAINING="grpo"
    )
    assert run.returncode == 0, run.stderr[-4000:]
    [policy] = registry_for(config).versions(1, POLICY)
    assert policy.metrics["processes"] == PROCESSES and policy.metrics["grpo"]["steps"] > 0


def test_only_training_spreads_over_processes(tmp_path):
    backbone = str(ensure_tiny_encoder(tmp_path / "models"))
    config = BackendConfig(data_dir=tmp_path / "data", reward_backbone=backbone)
    Store(config.db_path).initialize().upsert_project(1, "<View/>")
    run = accelerate_launch(config.data_dir, backbone, "preannotate", "--project", "1")
    assert run.returncode != 0
    assert "only train spreads" in run.stderr
