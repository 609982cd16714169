"""The active-learning simulator: the production selection and training code, a hidden oracle.

``rlhf-backend simulate --pool POOL.jsonl --labels LABELS.jsonl --eval EVAL.jsonl
--strategy NAME --budget 400 --batch-size 50 --seed 0 --out RESULT.json [--plot CURVE.png]``

A LABELS line may name its ``"annotator"`` (any string): the heads then train on the labels
weighted by each annotator's reliability, estimated by the function the service's training job
calls (:func:`trainer.reward_training.with_reliability`), and each curve point says who is
flagged (``reliability``).

The oracle reveals a pool pair's label only when the strategy asks for it. After each batch the
reward-model heads are retrained (warm start, as in production) and evaluated on EVAL, which is
never trained on. The backbone is frozen, so every text is embedded exactly once per run.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_core.acquisition import pair_features
from rlhf_core.reward_model import EnsembleHeads
from rlhf_core.selection import AdaptiveMix, Candidates, random_slots, resolve, select
from trainer.reward_training import (
    EmbeddingCache,
    Pair,
    RewardTrainingConfig,
    expected_calibration_error,
    laplace_posterior,
    pair_weights,
    preference_probabilities,
    train_heads,
    with_reliability,
)

logger = logging.getLogger(__name__)


class SimulationInputError(ValueError):
    """A malformed input file; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class PoolItem:
    id: str
    prompt: str
    responses: tuple[str, str]


def _read_jsonl(path: Path, required: dict[str, type]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SimulationInputError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SimulationInputError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise SimulationInputError(f"{path}:{number}: each line must be a JSON object")
            for key, kind in required.items():
                if key not in row:
                    raise SimulationInputError(f"{path}:{number}: missing {key!r}")
                if not isinstance(row[key], kind) or isinstance(row[key], bool) != (kind is bool):
                    raise SimulationInputError(
                        f"{path}:{number}: {key!r} must be {kind.__name__}, got {row[key]!r}"
                    )
            rows.append(row)
    return rows


def _check_responses(path: Path, row: dict[str, Any]) -> tuple[str, str]:
    responses = row["responses"]
    if len(responses) != 2 or not all(isinstance(r, str) for r in responses):
        raise SimulationInputError(f"{path}: id {row['id']!r}: 'responses' must be two strings")
    return responses[0], responses[1]


def _check_preferred(path: Path, row: dict[str, Any]) -> int:
    if row["preferred"] not in (0, 1):
        raise SimulationInputError(f"{path}: id {row['id']!r}: 'preferred' must be 0 or 1")
    return int(row["preferred"])


def _check_annotator(path: Path, row: dict[str, Any]) -> str | None:
    annotator = row.get("annotator")
    if annotator is None:
        return None
    if isinstance(annotator, bool) or not isinstance(annotator, str | int):
        raise SimulationInputError(
            f"{path}: id {row['id']!r}: 'annotator' must be a string, got {annotator!r}"
        )
    return str(annotator)


def load_annotators(labels_path: Path) -> dict[str, str]:
    """Who gave each label, for the LABELS lines that say (``"annotator"``)."""
    rows = _read_jsonl(labels_path, {"id": str, "preferred": int})
    found = {row["id"]: _check_annotator(labels_path, row) for row in rows}
    return {item: annotator for item, annotator in found.items() if annotator is not None}


def load_inputs(
    pool_path: Path, labels_path: Path, eval_path: Path
) -> tuple[list[PoolItem], dict[str, int], list[tuple[PoolItem, int]]]:
    fields: dict[str, type] = {"id": str, "prompt": str, "responses": list}
    pool_rows = _read_jsonl(pool_path, fields)
    pool = [PoolItem(r["id"], r["prompt"], _check_responses(pool_path, r)) for r in pool_rows]
    ids = {item.id for item in pool}
    if len(ids) != len(pool):
        raise SimulationInputError(f"{pool_path}: ids must be unique")
    labels = {}
    for row in _read_jsonl(labels_path, {"id": str, "preferred": int}):
        if row["id"] not in ids:
            raise SimulationInputError(f"{labels_path}: id {row['id']!r} is not in {pool_path}")
        labels[row["id"]] = _check_preferred(labels_path, row)
        _check_annotator(labels_path, row)
    unlabeled = ids - labels.keys()
    if unlabeled:
        raise SimulationInputError(
            f"{labels_path}: no label for {len(unlabeled)} pool ids, e.g. {sorted(unlabeled)[0]!r}"
        )
    evaluation = [
        (
            PoolItem(r["id"], r["prompt"], _check_responses(eval_path, r)),
            _check_preferred(eval_path, r),
        )
        for r in _read_jsonl(eval_path, {**fields, "preferred": int})
    ]
    if not evaluation:
        raise SimulationInputError(f"{eval_path}: no evaluation pairs")
    return pool, labels, evaluation


def fresh_heads(model: Any, seed: int) -> EnsembleHeads:
    """Untrained heads for ``model`` (a run starts from no labels)."""
    c = model.config
    return EnsembleHeads(model.hidden_size, c.num_heads, c.head_hidden, c.prior_scale, seed).to(
        model.device
    )


def _as_pair(item: PoolItem, preferred: int, annotator: str | None = None) -> Pair:
    chosen, rejected = item.responses[preferred], item.responses[1 - preferred]
    return Pair(item.prompt, chosen, rejected, annotator=annotator, group=item.id)


def simulate(
    model: Any,
    pool: list[PoolItem],
    labels: dict[str, int],
    evaluation: list[tuple[PoolItem, int]],
    strategy: str,
    budget: int,
    batch_size: int,
    seed: int,
    training: RewardTrainingConfig | None = None,
    cache: EmbeddingCache | None = None,
    also_evaluate: dict[str, list[tuple[PoolItem, int]]] | None = None,
    annotators: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the loop; ``model`` is a RewardModel (its heads are reset from ``seed``).

    ``cache`` may be shared between runs over the same texts with the same backbone.
    ``also_evaluate`` names more evaluation sets (e.g. the truth behind noisy labels): each
    curve point gets ``eval_accuracy_NAME`` for each. ``annotators``: who gave each pool
    label (:func:`load_annotators`); training then weighs labels by reliability.
    """
    strategy_name = resolve(strategy)
    if budget > len(pool):
        raise SimulationInputError(f"--budget {budget} is larger than the pool ({len(pool)} pairs)")
    if budget < 1 or batch_size < 1:
        raise SimulationInputError("--budget and --batch-size must be positive")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.heads = fresh_heads(model, seed)
    training = training or RewardTrainingConfig(seed=seed, heldout_fraction=0.0)
    extra = also_evaluate or {}
    who = annotators or {}

    cache = cache or EmbeddingCache(model.embed)
    as_first = [Pair(i.prompt, i.responses[0], i.responses[1]) for i in pool]
    eval_sets = {"": evaluation, **{f"_{name}": rows for name, rows in extra.items()}}
    eval_pairs = {name: [_as_pair(i, pref) for i, pref in rows] for name, rows in eval_sets.items()}
    cache.add(as_first + [p for pairs in eval_pairs.values() for p in pairs])  # the one pass
    embeddings = cache.matrix()
    first, second, _ = cache.pair_indices(as_first)
    emb = embeddings.numpy()
    features = pair_features(emb[first], emb[second])  # (N, H)
    eval_rows = {name: cache.pair_indices(pairs)[:2] for name, pairs in eval_pairs.items()}

    labeled: list[int] = []
    random_pick: list[bool] = []
    available = np.ones(len(pool), dtype=bool)
    mix = AdaptiveMix()
    posterior = laplace_posterior(
        model.head_rewards, embeddings, first[:0], second[:0], model.config.prior_scale
    )
    curve = []
    while len(labeled) < budget:
        k = min(batch_size, budget - len(labeled))
        candidates = np.flatnonzero(available)
        p_heads = preference_probabilities(
            model.head_rewards, embeddings, first[candidates], second[candidates]
        )
        pool_view = Candidates(p_heads, features[candidates], posterior)
        slots = random_slots(k, mix.split(k)) if strategy_name == "adaptive" else set()
        picked = select(strategy_name, pool_view, k, rng, mix)
        for position, index in enumerate(candidates[picked]):
            labeled.append(int(index))
            random_pick.append(strategy_name == "random" or position in slots)
            available[index] = False
        pairs = [_as_pair(pool[i], labels[pool[i].id], who.get(pool[i].id)) for i in labeled]
        pairs, reliability = with_reliability(pairs, cache, model.config.prior_scale)
        chosen, rejected, target = cache.pair_indices(pairs)
        if strategy_name == "adaptive":
            new = np.arange(len(labeled)) >= len(labeled) - len(picked)
            mix.update(
                pair_features(emb[chosen], emb[rejected]),
                target.numpy().astype(np.float64),
                np.array(random_pick),
                new,
            )
        train_heads(
            model.heads,
            model.head_rewards,
            embeddings,
            chosen,
            rejected,
            target,
            model.config.num_heads,
            training,
            pair_weight=pair_weights(pairs),
        )
        posterior = laplace_posterior(
            model.head_rewards, embeddings, chosen, rejected, model.config.prior_scale
        )
        point: dict[str, Any] = {"labels": len(labeled)}
        for name, (eval_chosen, eval_rejected) in eval_rows.items():
            p_eval = preference_probabilities(
                model.head_rewards, embeddings, eval_chosen, eval_rejected
            ).mean(axis=1)
            point[f"eval_accuracy{name}"] = round(float((p_eval > 0.5).mean()), 6)
            if not name:
                point["eval_ece"] = round(expected_calibration_error(p_eval), 6)
        if strategy_name == "adaptive":
            point["random_share"] = round(mix.share, 3)
        if reliability.annotators:
            point["reliability"] = {
                a: {"labels": r.labels, "reliability": r.reliability, "flag": r.flag}
                for a, r in sorted(reliability.annotators.items())
            }
        curve.append(point)
        logger.info(
            "%s: %d labels, eval accuracy %.3f", strategy, len(labeled), point["eval_accuracy"]
        )
    return {"strategy": strategy, "seed": seed, "curve": curve}


def plot_curves(results: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        xs = [p["labels"] for p in result["curve"]]
        ys = [p["eval_accuracy"] for p in result["curve"]]
        ax.plot(xs, ys, marker="o", label=f"{result['strategy']} (seed {result['seed']})")
    ax.set_xlabel("human labels")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title or "reward-model learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
