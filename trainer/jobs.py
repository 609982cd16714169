"""The jobs a worker runs: retrain a project's models, pre-annotate and reconcile its tasks.

A training job never changes what is served until its very last step: each candidate is written
to a fresh directory (atomically renamed into place) and recorded in the registry as a
candidate (or rejected, with the gate's evidence); then the candidates that passed their gates
are promoted together in one transaction that also queues their Label Studio sync (the outbox,
:mod:`trainer.label_studio_sync`). A crash before that transaction leaves the served models and
Label Studio as they were (the retry trains again); a crash after it leaves a pending sync that
a worker retries until Label Studio shows the served version.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

from rlhf_core.artifacts import remove_leftovers, write_atomically
from rlhf_core.config import BackendConfig
from rlhf_core.conversion import preference_pairs
from rlhf_core.db import database_for
from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.registry import (
    CANDIDATE,
    POLICY,
    PROMOTED,
    REJECTED,
    REWARD_MODEL,
    ModelVersion,
    Registry,
)
from rlhf_core.reliability import Reliability
from rlhf_core.serving import (
    embedding_store_path,
    load_version,
)
from rlhf_core.store import Job, Store
from rlhf_core.summary import project_agreement
from trainer.distributed import ONE_PROCESS, Ranks
from trainer.label_studio_sync import after_promotion, preannotate, project_tasks
from trainer.policy_training import (
    FeedbackExample,
    GateResult,
    PolicyTrainingConfig,
    UnpairedExample,
    grpo_gate,
    policy_gate,
    save_policy,
    train_policy,
)
from trainer.reward_training import (
    EmbeddingCache,
    Evaluation,
    GateDecision,
    Pair,
    Progress,
    RewardTrainingConfig,
    correct_choices,
    evaluate,
    laplace_posterior,
    pair_margins,
    pair_weights,
    preference_probabilities,
    should_promote,
    split_pairs,
    train_heads,
    with_reliability,
)
from trainer.versions import apply_retention

logger = logging.getLogger(__name__)

MIN_PAIRS = 2


def registry_for(config: BackendConfig) -> Registry:
    return Registry(database_for(config), config.artifacts_path)


def train_job(config: BackendConfig, job: Job, ranks: Ranks = ONE_PROCESS) -> dict[str, Any]:
    """Retrain the project's reward model, then its policy; promote what passes the gates.

    Across several processes (:mod:`trainer.distributed`), rank 0 reads the store and trains the
    reward model; every rank trains the policy on rank 0's data; rank 0 gates and records.
    """
    store = Store(database_for(config))
    registry = registry_for(config)
    records, feedback = ranks.share(
        (
            preference_pairs(
                store.records(job.project_id, "preference"),
                store.records(job.project_id, "ranking"),
                config.max_ranking_pairs,
            ),
            policy_records(store, job.project_id) if config.policy_training != "off" else [],
        )
        if ranks.is_main
        else ([], [])
    )
    if len(records) < MIN_PAIRS and not feedback:
        return {"trained": False, "reason": f"{len(records)} preference pairs; need {MIN_PAIRS}"}
    result: dict[str, Any] = {}
    if ranks.is_main:  # this job holds the project's one training: no one else writes there
        remove_leftovers(registry.project_dir(job.project_id))
    earlier = {v.kind: v for v in registry.recorded_by_job(job.project_id, job.job_id)}
    if any(v.status == PROMOTED for v in earlier.values()):  # crashed after its promotion
        after_promotion(config, registry, job.project_id)
        served = registry.served_version(job.project_id)
        return {"trained": False, "reason": f"an earlier attempt promoted {served}"}
    if ranks.is_main and len(records) < MIN_PAIRS:  # language feedback or verdicts only
        reason = f"{len(records)} preference pairs; the reward model needs {MIN_PAIRS}"
        result = {"trained": False, "passed": False, "version": None, "reason": reason}
    elif ranks.is_main:
        result = _earlier_reward_model(earlier.get(REWARD_MODEL), records) or train_reward_model(
            config,
            registry,
            job.project_id,
            records,
            job_progress(store, job, "reward model"),
            job_id=job.job_id,
        )
        reached("reward model recorded")
    judge = ranks.share(
        registry.get(job.project_id, REWARD_MODEL, result["version"])
        if ranks.is_main and result["passed"]
        else None
    )  # the policy is trained and gated with the reward model this job will serve
    if config.policy_training != "off":
        result["policy"] = train_policy_version(
            config,
            registry,
            job.project_id,
            records,
            feedback,
            job_progress(store, job, "policy") if ranks.is_main else None,
            ranks=ranks,
            judge_version=judge,
            job_id=job.job_id,
        )
        reached("policy recorded")
    if ranks.is_main:
        promote_passed(config, registry, job.project_id, result)
        if result["promoted"] or result.get("policy", {}).get("promoted"):
            pruned = apply_retention(registry, job.project_id, config.keep_versions)
            if pruned:
                result["pruned"] = [p.version for p in pruned]
    return result


def policy_records(store: Store, project_id: int) -> list[dict[str, Any]]:
    """What the policy learns from besides pairs: language feedback and unpaired verdicts.

    Feedback on the whole item (``response`` None) gets as its draft the response the same
    annotation ranked best, where it ranked one."""
    best: dict[int, str] = {}
    for record in store.records(project_id, "ranking"):
        best.setdefault(record["annotation"], record["ranking"][0][0])
    for record in store.records(project_id, "preference"):
        if not record.get("tie"):
            best.setdefault(record["annotation"], record["chosen"])
    feedback = [
        {**r, "response": r.get("response") or best.get(r["annotation"], "")}
        for r in store.records(project_id, "feedback")
    ]
    return feedback + store.records(project_id, "unpaired")


def _earlier_reward_model(
    earlier: ModelVersion | None, records: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The reward model an earlier attempt of this job recorded, if trained on the same data."""
    if earlier is None:
        return None
    if earlier.data_snapshot.get("annotations") != sorted({r["annotation"] for r in records}):
        return None
    return {
        "trained": True,
        "version": earlier.version,
        "passed": earlier.status == CANDIDATE,
        "reason": earlier.reason,
        "metrics": earlier.metrics,
        "resumed": True,
    }


def reached(phase: str) -> None:
    """A phase boundary of a training job (the crash tests inject their faults here)."""
    logger.debug("training job: %s", phase)


def promote_passed(
    config: BackendConfig, registry: Registry, project_id: int, result: dict[str, Any]
) -> None:
    """Promote every candidate of this job that passed its gate, together, then try the sync."""
    passed = {REWARD_MODEL: result["version"]} if result["passed"] else {}
    policy = result.get("policy", {})
    if policy.get("passed"):
        passed[POLICY] = policy["version"]
    result["promoted"] = REWARD_MODEL in passed
    if policy:
        policy["promoted"] = POLICY in passed
    if not passed:
        return
    result["model_version"] = registry.promote(project_id, passed)
    reached("promoted")
    after_promotion(config, registry, project_id)


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
    job_id: int | None = None,
) -> dict[str, Any]:
    training = training or RewardTrainingConfig(
        promotion_tolerance=config.promotion_tolerance,
        min_heldout_pairs=config.min_heldout_pairs,
    )
    pairs = [Pair.from_record(r) for r in records]
    train, heldout = split_pairs(pairs, training.heldout_fraction)
    if not train:
        train = heldout  # too few tasks for a split yet: learn from what there is
    served = registry.served(project_id, REWARD_MODEL)
    serving_model = load_version(config, served)
    candidate = copy.deepcopy(serving_model)  # warm start from what is served

    store = EmbeddingStore(embedding_store_path(config))
    cache = EmbeddingCache(lambda prompts, responses: store.embed(candidate, prompts, responses))
    cache.add(pairs)
    embeddings = cache.matrix()
    reliability = Reliability({})
    if config.annotator_reliability:
        train, reliability = with_reliability(train, cache, candidate.config.prior_scale)
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
        pair_weight=pair_weights(train),
        margins=pair_margins(train),
    )
    seconds = time.monotonic() - started
    posterior = laplace_posterior(
        candidate.head_rewards, embeddings, chosen, rejected, candidate.config.prior_scale
    )
    candidate.posterior_precision = posterior.precision
    reached("reward model trained")

    new_eval, old_eval = (_evaluate(model, cache, heldout) for model in (candidate, serving_model))
    gate = _reward_gate(candidate, serving_model, cache, train, heldout, training)
    version, path = registry.new_version_dir(project_id, REWARD_MODEL)
    metrics = {
        "gate": gate.evidence,
        "heldout": new_eval.as_dict(),
        "serving_heldout": old_eval.as_dict(),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(len(train) * training.epochs / max(seconds, 1e-9), 1),
        "reliability": {**reliability.as_dict(), "agreement": project_agreement(records)},
        **stats,
    }
    snapshot = {
        "records": len(records),
        "annotations": sorted({r["annotation"] for r in records}),
        "warm_start": served.version,
        "job": job_id,
    }
    provenance = {
        "version": version,
        "trained": True,
        "project": project_id,
        "metrics": metrics,
        "data": snapshot,
    }
    digest = write_atomically(path, lambda tmp: candidate.save(tmp, provenance))
    registry.record(
        project_id,
        REWARD_MODEL,
        version,
        path,
        config={"model": candidate.config.__dict__, "training": training.__dict__},
        data_snapshot=snapshot,
        metrics=metrics,
        status=CANDIDATE if gate.promote else REJECTED,
        reason=gate.reason,
        artifact_sha256=digest,
    )
    logger.info(
        "project %s: %s %s (%s)",
        project_id,
        version,
        "passed its gate" if gate.promote else "rejected",
        gate.reason,
    )
    return {
        "trained": True,
        "version": version,
        "passed": gate.promote,
        "reason": gate.reason,
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
    judge_version: ModelVersion | None = None,
    job_id: int | None = None,
) -> dict[str, Any]:
    """DPO or GRPO (and ILF) from the serving policy, gated against the serving policy.

    ``judge_version`` is the reward model the job is about to serve (default: the served one);
    it rewards GRPO and judges a DPO candidate. Pairs of held-out tasks are not trained on:
    their prompts are the gate's test set. Every rank trains; rank 0 alone gates, saves and
    records (the others return the training stats).
    """
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
        FeedbackExample(r["prompt"], r.get("response") or "", r["feedback"])
        for r in feedback_records
        if r.get("feedback")
    ]
    unpaired = [
        UnpairedExample(r["prompt"], r["response"], bool(r["desirable"]))
        for r in feedback_records
        if "desirable" in r
    ]
    if not gate_prompts:  # no pairs at all: the prompts the policy was told about
        gate_prompts = list(dict.fromkeys(r["prompt"] for r in feedback_records))
    served_rm = judge_version or registry.served(project_id, REWARD_MODEL)
    judge = load_version(config, served_rm)
    served = registry.served(project_id, POLICY)
    serving = load_version(config, served)
    candidate, stats = train_policy(
        serving,
        train,
        feedback,
        training,
        similarity=_embedding_similarity(judge),
        on_step=progress or Progress(f"project {project_id} policy (rank {ranks.index})"),
        ranks=ranks,
        judge=judge.score_heads,
        unpaired=unpaired,
    )
    reached("policy trained")
    if not ranks.is_main:
        return {"rank": ranks.index, "passed": False, "metrics": stats}
    if not pairs and not judge.trained:
        gate = GateResult(
            math.nan,
            0,
            False,
            "no trained reward model to judge the candidate yet (the project has fewer than "
            f"{MIN_PAIRS} preference pairs): recorded, not promoted; serve it with "
            "`rlhf-backend serve-version` if you want it",
            {"rule": "no judge"},
        )
    elif training.method == "grpo":  # optimised against the judge: humans' pairs decide
        gate = grpo_gate(judge.score_heads, candidate, serving, heldout, training)
    else:
        gate = policy_gate(judge.score_heads, candidate, serving, gate_prompts, training)
    version, path = registry.new_version_dir(project_id, POLICY)
    metrics = {"gate": gate.as_dict(), "judge": served_rm.version, **stats}
    snapshot = {
        "records": len(records) + len(feedback_records),
        "annotations": sorted({r["annotation"] for r in records + feedback_records}),
        "warm_start": served.version,
        "job": job_id,
    }
    digest = write_atomically(path, lambda tmp: save_policy(candidate, tmp))
    registry.record(
        project_id,
        POLICY,
        version,
        path,
        config={"training": training.__dict__, "base": serving.version},
        data_snapshot=snapshot,
        metrics=metrics,
        status=CANDIDATE if gate.promote else REJECTED,
        reason=gate.reason,
        artifact_sha256=digest,
    )
    logger.info(
        "project %s: %s %s (%s)",
        project_id,
        version,
        "passed its gate" if gate.promote else "rejected",
        gate.reason,
    )
    return {"version": version, "passed": gate.promote, "reason": gate.reason, "metrics": metrics}


def _embedding_similarity(model: Any) -> Any:
    """Cosine similarity of texts to feedbacks in the reward model's backbone space (ILF)."""

    def similarity(texts: list[str], feedbacks: list[str]) -> Any:
        import torch

        a = model.embed([""] * len(texts), texts)
        b = model.embed([""] * len(feedbacks), feedbacks)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu().numpy()

    return similarity


def _reward_gate(
    candidate: Any,
    serving: Any,
    cache: EmbeddingCache,
    train: list[Pair],
    heldout: list[Pair],
    training: RewardTrainingConfig,
) -> GateDecision:
    """Held-out pairs decide once there are enough of them (and the candidate did not train on
    them); until then every labelled pair does, and the decision says it was in-sample."""
    decisive_heldout = sum(not p.tie for p in heldout)
    in_sample = decisive_heldout < training.min_heldout_pairs or train is heldout
    pairs = list(dict.fromkeys(train + heldout)) if in_sample else heldout
    return should_promote(
        correct_choices(candidate.head_rewards, cache, pairs),
        correct_choices(serving.head_rewards, cache, pairs),
        training.promotion_tolerance,
        training.min_heldout_pairs,
        in_sample=in_sample,
    )


def _evaluate(model: Any, cache: EmbeddingCache, pairs: list[Pair]) -> Evaluation:
    if not pairs:
        return evaluate([], None)  # type: ignore[arg-type]
    chosen, rejected, _ = cache.pair_indices(pairs)
    return evaluate(
        pairs, preference_probabilities(model.head_rewards, cache.matrix(), chosen, rejected)
    )


def preannotate_job(config: BackendConfig, job: Job) -> dict[str, Any]:
    store = Store(database_for(config))
    return preannotate(config, store, registry_for(config), job.project_id, progress=True)


def reconcile_job(config: BackendConfig, job: Job) -> dict[str, Any]:
    """Bring the store level with the project's annotations in Label Studio."""
    from trainer.reconcile import reconcile_project

    store = Store(database_for(config))
    tasks = project_tasks(config, store, job.project_id)
    return reconcile_project(store, job.project_id, tasks, config.train_every).as_dict()
