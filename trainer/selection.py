"""Choosing which pairs humans label next, one batch at a time.

Strategies score candidate pairs with an acquisition function (:mod:`trainer.acquisition`) and
take the best. ``batch`` (the default) is the batch-aware one: greedy on the margin (how close
the ensemble's mean prediction is to a coin flip), discounting a candidate by its similarity to
pairs already picked in the same batch, so a batch never spends several labels on
near-duplicates. With no labels yet (cold start) the heads' disagreement carries no
information about the data, so every strategy but ``random`` picks a diverse batch instead
(greedy farthest-point in pair-embedding space).
"""

from __future__ import annotations

import numpy as np

from trainer.acquisition import BATCH_VALUE, STRATEGIES

SELECTION_STRATEGIES = (*STRATEGIES, "batch")
DEFAULT_SELECTION = "batch"
# Label Studio's pool is ordered batch-aware for this many tasks (the greedy costs
# O(limit · N · D)): far more than a team labels between two retrains, which re-score the pool.
POOL_ORDER_LIMIT = 2000
SCORE_STEP = 1e-6  # the resolution of a prediction's score (rounded to 6 decimals)


def resolve(name: str) -> str:
    name = DEFAULT_SELECTION if name == "default" else name
    if name not in SELECTION_STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(SELECTION_STRATEGIES)}, default"
        )
    return name


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def farthest_points(features: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Greedy k-center on cosine distance: a diverse set of ``k`` rows."""
    unit = _unit(features)
    chosen = [int(rng.integers(len(unit)))]
    closest = 1.0 - unit @ unit[chosen[0]]
    while len(chosen) < min(k, len(unit)):
        nxt = int(np.argmax(closest))
        chosen.append(nxt)
        closest = np.minimum(closest, 1.0 - unit @ unit[nxt])
    return chosen


def diverse_greedy(
    value: np.ndarray, features: np.ndarray, k: int, similarity_weight: float = 1.0
) -> tuple[list[int], list[float]]:
    """Greedy: value discounted by the highest cosine similarity to anything already picked.

    Returns the picks in order and the discounted value each was picked at."""
    unit = _unit(features)
    picked: list[int] = []
    gains: list[float] = []
    max_sim = np.zeros(len(value))
    available = np.ones(len(value), dtype=bool)
    for _ in range(min(k, len(value))):
        adjusted = np.where(
            available, value * (1.0 - similarity_weight * np.clip(max_sim, 0, 1)), -np.inf
        )
        best = int(np.argmax(adjusted))
        picked.append(best)
        gains.append(float(adjusted[best]))
        available[best] = False
        max_sim = np.maximum(max_sim, unit @ unit[best])
    return picked, gains


def pool_scores(
    strategy: str, value: np.ndarray, features: np.ndarray, limit: int = POOL_ORDER_LIMIT
) -> np.ndarray:
    """Label Studio scores for a pool of tasks, lowest = label first: ``1 − value``.

    ``value`` (N,): each task's acquisition value (that of its most informative pair, in [0, 1]);
    ``features`` (N, D): that pair's feature vector. For ``batch`` (the default) the ascending
    order of the scores is the batch-aware greedy order: the first ``limit`` picks score
    ``1 − the discounted value they were picked at`` (a task's discounted value only shrinks as
    picks accumulate, so these never decrease), and the rest score above the last pick.
    The first pick is always the most informative task, so its score is exactly ``1 − value``.
    """
    scores = 1.0 - value
    if resolve(strategy) != "batch" or len(value) < 2:
        return scores
    picked, gains = diverse_greedy(value, features, limit)
    ordered = 1.0 - np.asarray(gains)
    rest = np.ones(len(value), dtype=bool)
    rest[picked] = False
    scores[rest] = np.maximum(scores[rest], ordered[-1] + SCORE_STEP)
    scores[picked] = ordered
    return np.clip(scores, 0.0, 1.0)


def select(
    strategy: str,
    p_heads: np.ndarray,
    features: np.ndarray,
    k: int,
    rng: np.random.Generator,
    cold_start: bool,
) -> list[int]:
    """Indices of the ``k`` candidate pairs to label next.

    ``p_heads`` (P, K): per-head P(first response wins); ``features`` (P, D): one vector per
    pair (e.g. the difference of the two responses' embeddings) for diversity.
    """
    strategy = resolve(strategy)
    if strategy == "random":
        return [int(i) for i in rng.choice(len(p_heads), size=min(k, len(p_heads)), replace=False)]
    if cold_start:
        return farthest_points(features, k, rng)
    if strategy == "batch":
        return diverse_greedy(STRATEGIES[BATCH_VALUE](p_heads), features, k)[0]
    value = STRATEGIES[strategy](p_heads, rng)
    order = np.argsort(-value, kind="stable")
    return [int(i) for i in order[:k]]
