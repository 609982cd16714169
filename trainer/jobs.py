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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_backend.arena import Arena
from ml_backend.config import BackendConfig
from ml_backend.conversion import preference_pairs
from ml_backend.label_schema import parse_label_config
from ml_backend.serving import (
    ModelServer,
    embedding_store_path,
    policy_config,
    reward_model_config,
)
from ml_backend.store import JOB_PREANNOTATE, Job, Store
from trainer.dispatch import notify_workers
from trainer.distributed import ONE_PROCESS, Ranks
from trainer.embedding_store import EmbeddingStore
from trainer.policy_training import (
    FeedbackExample,
    PolicyTrainingConfig,
    policy_gate,
    save_policy,
    train_policy,
)
from trainer.registry import POLICY, PROMOTED, REJECTED, REWARD_MODEL, Registry
from trainer.reward_training import (
    EmbeddingCache,
    Evaluation,
    Pair,
    Progress,
    RewardTrainingConfig,
    evaluate,
    laplace_posterior,
    preference_probabilities,
    should_promote,
    split_pairs,
    train_heads,
)
from trainer.versions import apply_retention

logger = logging.getLogger(__name__)

MIN_PAIRS = 2


def registry_for(config: BackendConfig) -> Registry:
    return Registry(config.db_path, config.data_dir / "models")


def train_job(config: BackendConfig, job: Job, ranks: Ranks = ONE_PROCESS) -> dict[str, Any]:
    """Retrain the project's reward model, then its policy; promote what passes the gates.

    Across several processes (:mod:`trainer.distributed`), rank 0 reads the store and trains the
    reward model; every rank trains the policy on rank 0's data; rank 0 gates and records.
    """
    store = Store(config.db_path, config.store_sync)
    registry = registry_for(config)
    records, feedback = ranks.share(
        (
            preference_pairs(
                store.records(job.project_id, "preference"),
                store.records(job.project_id, "ranking"),
                config.max_ranking_pairs,
            ),
            store.records(job.project_id, "feedback") if config.policy_training != "off" else [],
        )
        if ranks.is_main
        else ([], [])
    )
    if len(records) < MIN_PAIRS:
        return {"trained": False, "reason": f"{len(records)} preference pairs; need {MIN_PAIRS}"}
    result: dict[str, Any] = {}
    if ranks.is_main:
        result = train_reward_model(
            config, registry, job.project_id, records, job_progress(store, job, "reward model")
        )
    ranks.wait()  # for the judge the policy is trained and gated with
    if config.policy_training != "off":
        result["policy"] = train_policy_version(
            config,
            registry,
            job.project_id,
            records,
            feedback,
            job_progress(store, job, "policy") if ranks.is_main else None,
            ranks=ranks,
        )
    if ranks.is_main and (result["promoted"] or result.get("policy", {}).get("promoted")):
        after_promotion(config, store, registry, job.project_id)
        pruned = apply_retention(registry, job.project_id, config.keep_versions)
        if pruned:
            result["pruned"] = [p.version for p in pruned]
    return result


def job_progress(store: Store, job: Job, phase: str, every_s: float = 1.0) -> Progress:
    """A progress report that also lands in the job's row (at most once a second)."""
    last = [0.0]

    def report(state: dict[str, float]) -> None:
        if time.monotonic() - last[0] >= every_s or state["step"] >= state["total"]:
            last[0] = time.monotonic()
            store.set_job_progress(job.job_id, {"phase": phase, **state})

    return Progress(f"project {job.project_id} {phase}", report)


def train_reward_model(
    config: BackendConfig,
    registry: Registry,
    project_id: int,
    records: list[dict[str, Any]],
    progress: Progress | None = None,
    training: RewardTrainingConfig | None = None,
) -> dict[str, Any]:
    from trainer.reward_model import RewardModel

    training = training or RewardTrainingConfig(promotion_tolerance=config.promotion_tolerance)
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

    store = EmbeddingStore(embedding_store_path(config))
    cache = EmbeddingCache(lambda prompts, responses: store.embed(candidate, prompts, responses))
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
    posterior = laplace_posterior(
        candidate.head_rewards, embeddings, chosen, rejected, candidate.config.prior_scale
    )
    candidate.posterior_precision = posterior.precision

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
    provenance = {
        "version": version,
        "trained": True,
        "project": project_id,
        "metrics": metrics,
        "data": snapshot,
    }
    _save_atomically(path, lambda tmp: candidate.save(tmp, provenance))
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


def train_policy_version(
    config: BackendConfig,
    registry: Registry,
    project_id: int,
    records: list[dict[str, Any]],
    feedback_records: list[dict[str, Any]],
    progress: Progress | None = None,
    training: PolicyTrainingConfig | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> dict[str, Any]:
    """DPO (and ILF) from the serving policy; the serving reward model judges the candidate.

    Pairs of held-out tasks are not trained on: their prompts are the gate's test set. Every
    rank trains; rank 0 alone gates, saves and records (the others return the training stats).
    """
    from trainer.policy import Policy
    from trainer.reward_model import RewardModel

    training = training or PolicyTrainingConfig(
        method=config.policy_training,
        max_new_tokens=config.max_new_tokens,
        uncertainty_penalty=config.uncertainty_penalty,
    )
    pairs = [Pair.from_record(r) for r in records]
    train, heldout = split_pairs(pairs, RewardTrainingConfig().heldout_fraction)
    train = [p for p in train if not p.tie]
    gate_prompts = list(dict.fromkeys(p.prompt for p in heldout))
    if not gate_prompts:  # too few tasks for a held-out split yet
        gate_prompts = list(dict.fromkeys(p.prompt for p in pairs))
    feedback = [
        FeedbackExample(r["prompt"], r["response"], r["feedback"])
        for r in feedback_records
        if r.get("response") and r.get("feedback")
    ]
    served_rm = registry.served(project_id, REWARD_MODEL)
    judge = (
        RewardModel.load(served_rm.path)
        if served_rm.path
        else RewardModel.create(reward_model_config(config))
    )
    served = registry.served(project_id, POLICY)
    serving = Policy.load(
        policy_config(config, str(served.path) if served.path else None),
        config.data_dir / "cache",
    )
    candidate, stats = train_policy(
        serving,
        train,
        feedback,
        training,
        similarity=_embedding_similarity(judge),
        on_step=progress or Progress(f"project {project_id} policy (rank {ranks.index})"),
        ranks=ranks,
        judge=judge.score_heads,
    )
    if not ranks.is_main:
        return {"rank": ranks.index, "promoted": False, "metrics": stats}
    gate = policy_gate(judge.score_heads, candidate, serving, gate_prompts, training)
    version, path = registry.new_version_dir(project_id, POLICY)
    metrics = {"gate": gate.as_dict(), "judge": served_rm.version, **stats}
    snapshot = {
        "records": len(records) + len(feedback_records),
        "annotations": sorted({r["annotation"] for r in records + feedback_records}),
        "warm_start": served.version,
    }
    _save_atomically(path, lambda tmp: save_policy(candidate, tmp))
    registry.record(
        project_id,
        POLICY,
        version,
        path,
        config={"training": training.__dict__, "base": serving.version},
        data_snapshot=snapshot,
        metrics=metrics,
        status=PROMOTED if gate.promote else REJECTED,
        reason=gate.reason,
    )
    logger.info(
        "project %s: %s %s (%s)",
        project_id,
        version,
        "promoted" if gate.promote else "rejected",
        gate.reason,
    )
    return {"version": version, "promoted": gate.promote, "reason": gate.reason, "metrics": metrics}


def _embedding_similarity(model: Any) -> Any:
    """Cosine similarity of texts to feedbacks in the reward model's backbone space (ILF)."""

    def similarity(texts: list[str], feedbacks: list[str]) -> Any:
        import torch

        a = model.embed([""] * len(texts), texts)
        b = model.embed([""] * len(feedbacks), feedbacks)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu().numpy()

    return similarity


def _evaluate(model: Any, cache: EmbeddingCache, pairs: list[Pair]) -> Evaluation:
    if not pairs:
        return evaluate([], None)  # type: ignore[arg-type]
    chosen, rejected, _ = cache.pair_indices(pairs)
    return evaluate(
        pairs, preference_probabilities(model.head_rewards, cache.matrix(), chosen, rejected)
    )


def _save_atomically(path: Path, save: Callable[[Path], None]) -> None:
    """``save`` writes into a scratch directory that is renamed to ``path`` only when complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(path, ignore_errors=True)  # a leftover from a crash before it was recorded
    tmp.rename(path)


def after_promotion(
    config: BackendConfig, store: Store, registry: Registry, project_id: int
) -> None:
    """Label Studio follows the new version: project model_version, and a re-scored pool."""
    version = registry.served_version(project_id)
    store.set_project_model_version(project_id, version)
    job = store.enqueue_job(project_id, JOB_PREANNOTATE, trigger=f"promoted {version}")
    notify_workers(config, job.job_id if job else None, "promotion")


def preannotate_job(config: BackendConfig, job: Job) -> dict[str, Any]:
    from ml_backend.label_studio import LabelStudioTasks, client
    from ml_backend.preannotate import RecordingTasks, preannotate_project
    from ml_backend.trust import Credentials
    from ml_backend.vault import Vault

    store = Store(config.db_path, config.store_sync)
    project = store.project(job.project_id)
    if project is None:
        raise LookupError(f"project {job.project_id} is not connected")
    # The token goes only to the host it came with, or to LABEL_STUDIO_URL (ml_backend/trust.py).
    connection = Credentials(config, store, Vault.for_config(config)).connection(project)
    if connection is None:
        raise LookupError(
            "no Label Studio URL/token for this project: reconnect the model in Label Studio "
            "(its /setup brings both), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    models = ModelServer(config, registry_for(config))
    tasks = LabelStudioTasks(client(connection))
    version = models.served_version(job.project_id)
    report = preannotate_project(
        job.project_id,
        parse_label_config(project.label_config),
        models,
        RecordingTasks(tasks, store.note_task_models, job.project_id, version),
        num_candidates=config.num_candidates,
        strategy=config.strategy,
        progress=True,
        arena=_arena(config, store, models, job.project_id),
    )
    return report.as_dict()


def _arena(config: BackendConfig, store: Store, models: ModelServer, project_id: int) -> Arena:
    registry = models.registry
    return Arena(
        project_id=project_id,
        share=config.arena_share,
        current=registry.served(project_id, POLICY).version,
        opponents=models.arena_opponents(project_id),
        reward_model=registry.served(project_id, REWARD_MODEL).version,
        generate_with=lambda version, prompts, n: models.generate_with(
            project_id, version, prompts, n
        ),
        record=store.replace_arena_responses,
    )
