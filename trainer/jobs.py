"""The jobs a worker runs: retrain a project's models, and pre-annotate its tasks.

A training job never changes what is served until its very last step: the candidate is written
to a fresh directory (atomically renamed into place) and recorded in the registry; only a
candidate that passes the promotion gate becomes the served version. A crash anywhere before
that leaves the served models, the store and the registry as they were.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ml_backend.config import BackendConfig
from ml_backend.label_schema import parse_label_config
from ml_backend.serving import ModelServer, reward_model_config
from ml_backend.store import JOB_PREANNOTATE, Job, Store
from trainer.registry import PROMOTED, REJECTED, REWARD_MODEL, Registry
from trainer.reward_training import (
    EmbeddingCache,
    Evaluation,
    Pair,
    Progress,
    RewardTrainingConfig,
    evaluate,
    preference_probabilities,
    should_promote,
    split_pairs,
    train_heads,
)

logger = logging.getLogger(__name__)

MIN_PAIRS = 2


def registry_for(config: BackendConfig) -> Registry:
    return Registry(config.db_path, config.data_dir / "models")


def train_job(config: BackendConfig, job: Job, progress: Progress | None = None) -> dict[str, Any]:
    store = Store(config.db_path)
    registry = registry_for(config)
    records = store.records(job.project_id, "preference")
    if len(records) < MIN_PAIRS:
        return {"trained": False, "reason": f"{len(records)} preference pairs; need {MIN_PAIRS}"}
    result = train_reward_model(config, registry, job.project_id, records, progress)
    if result["promoted"]:
        after_promotion(config, store, registry, job.project_id)
    return result


def train_reward_model(
    config: BackendConfig,
    registry: Registry,
    project_id: int,
    records: list[dict[str, Any]],
    progress: Progress | None = None,
    training: RewardTrainingConfig | None = None,
) -> dict[str, Any]:
    from trainer.reward_model import RewardModel

    training = training or RewardTrainingConfig()
    pairs = [Pair.from_record(r) for r in records]
    train, heldout = split_pairs(pairs, training.heldout_fraction)
    if not train:
        train = heldout  # too few tasks for a split yet: learn from what there is
    served = registry.served(project_id, REWARD_MODEL)
    serving_model = (
        RewardModel.load(served.path)
        if served.path
        else RewardModel.create(reward_model_config(config))
    )
    candidate = copy.deepcopy(serving_model)  # warm start from what is served

    cache = EmbeddingCache(candidate.embed)
    cache.add(train + heldout)
    embeddings = cache.matrix()
    started = time.monotonic()
    chosen, rejected, target = cache.pair_indices(train)
    stats = train_heads(
        candidate.heads,
        candidate.head_rewards,
        embeddings,
        chosen,
        rejected,
        target,
        candidate.config.num_heads,
        training,
        on_step=progress or Progress(f"project {project_id} reward model"),
    )
    seconds = time.monotonic() - started

    new_eval, old_eval = (_evaluate(model, cache, heldout) for model in (candidate, serving_model))
    promote, reason = should_promote(new_eval, old_eval, training.promotion_tolerance)
    if served.path is None and new_eval.accuracy is None:
        promote, reason = True, "first trained version (no held-out pairs yet)"
    version, path = registry.new_version_dir(project_id, REWARD_MODEL)
    metrics = {
        "heldout": new_eval.as_dict(),
        "serving_heldout": old_eval.as_dict(),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(len(train) * training.epochs / max(seconds, 1e-9), 1),
        **stats,
    }
    snapshot = {
        "records": len(records),
        "annotations": sorted({r["annotation"] for r in records}),
        "warm_start": served.version,
    }
    _save_atomically(
        candidate,
        path,
        {
            "version": version,
            "trained": True,
            "project": project_id,
            "metrics": metrics,
            "data": snapshot,
        },
    )
    registry.record(
        project_id,
        REWARD_MODEL,
        version,
        path,
        config={"model": candidate.config.__dict__, "training": training.__dict__},
        data_snapshot=snapshot,
        metrics=metrics,
        status=PROMOTED if promote else REJECTED,
        reason=reason,
    )
    logger.info(
        "project %s: %s %s (%s)", project_id, version, "promoted" if promote else "rejected", reason
    )
    return {
        "trained": True,
        "version": version,
        "promoted": promote,
        "reason": reason,
        "metrics": metrics,
    }


def _evaluate(model: Any, cache: EmbeddingCache, pairs: list[Pair]) -> Evaluation:
    if not pairs:
        return evaluate([], None)  # type: ignore[arg-type]
    chosen, rejected, _ = cache.pair_indices(pairs)
    return evaluate(
        pairs, preference_probabilities(model.head_rewards, cache.matrix(), chosen, rejected)
    )


def _save_atomically(model: Any, path: Path, provenance: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, provenance)
    shutil.rmtree(path, ignore_errors=True)  # a leftover from a crash before it was recorded
    tmp.rename(path)


def after_promotion(
    config: BackendConfig, store: Store, registry: Registry, project_id: int
) -> None:
    """Label Studio follows the new version: project model_version, and a re-scored pool."""
    version = registry.served_version(project_id)
    store.set_project_model_version(project_id, version)
    store.enqueue_job(project_id, JOB_PREANNOTATE, trigger=f"promoted {version}")


def preannotate_job(config: BackendConfig, job: Job) -> dict[str, Any]:
    from ml_backend.label_studio import LabelStudioTasks, client
    from ml_backend.preannotate import preannotate_project

    store = Store(config.db_path)
    project = store.project(job.project_id)
    if project is None:
        raise LookupError(f"project {job.project_id} is not connected")
    hostname = config.label_studio_url or project.hostname
    token = config.label_studio_api_key or project.access_token
    if not hostname or not token:
        raise LookupError(
            "no Label Studio URL/token: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    models = ModelServer(config, registry_for(config))
    report = preannotate_project(
        job.project_id,
        parse_label_config(project.label_config),
        models,
        LabelStudioTasks(client(hostname, token)),
        num_candidates=config.num_candidates,
        strategy=config.strategy,
        progress=True,
    )
    return report.as_dict()
