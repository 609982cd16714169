"""Choosing which pairs humans label next, one batch at a time.

Strategies score candidate pairs with an acquisition function (:mod:`trainer.acquisition`) and
take the best. ``batch`` is the batch-aware one: greedy BALD that discounts a candidate by its
similarity to pairs already picked in the same batch, so a batch never spends several labels on
near-duplicates. With no labels yet (cold start) the heads' disagreement carries no
information about the data, so every strategy but ``random`` picks a diverse batch instead
(greedy farthest-point in pair-embedding space).
"""

from __future__ import annotations

import numpy as np

from trainer.acquisition import STRATEGIES, bald

SELECTION_STRATEGIES = (*STRATEGIES, "batch")
DEFAULT_SELECTION = "batch"


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
) -> list[int]:
    """Greedy: value discounted by the highest cosine similarity to anything already picked."""
    unit = _unit(features)
    picked: list[int] = []
    max_sim = np.zeros(len(value))
    available = np.ones(len(value), dtype=bool)
    for _ in range(min(k, len(value))):
        adjusted = np.where(
            available, value * (1.0 - similarity_weight * np.clip(max_sim, 0, 1)), -np.inf
        )
        best = int(np.argmax(adjusted))
        picked.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, unit @ unit[best])
    return picked


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
        return diverse_greedy(bald(p_heads), features, k)
    value = STRATEGIES[strategy](p_heads, rng)
    order = np.argsort(-value, kind="stable")
    return [int(i) for i in order[:k]]
