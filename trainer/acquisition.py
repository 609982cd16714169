"""Acquisition functions: how much a human label on a pair would teach the reward model.

Each takes the ensemble's per-head preference probabilities for a set of pairs,
``p_heads`` of shape ``(P, K)`` (P pairs, K heads, ``p = sigmoid(r_a - r_b)`` per head), and
returns one value per pair in ``[0, 1]``, higher = more worth a label.

* ``entropy``:  entropy of the mean prediction (total uncertainty), in bits.
* ``margin``:   1 − |2·p̄ − 1|: how close the mean prediction is to a coin flip.
* ``variance``: 4·Var_k(p_k): ensemble disagreement (Christiano et al. 2017).
* ``bald``:     mutual information H(p̄) − mean_k H(p_k): disagreement that a label resolves
                (Houlsby et al. 2011), in bits.
* ``random``:   uniform noise: the baseline every strategy must beat.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LN2 = float(np.log(2.0))
EPS = 1e-7


def _binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)) / LN2


def entropy(p_heads: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    return _binary_entropy_bits(p_heads.mean(axis=-1))


def margin(p_heads: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    return 1.0 - np.abs(2.0 * p_heads.mean(axis=-1) - 1.0)


def variance(p_heads: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    return np.clip(4.0 * p_heads.var(axis=-1), 0.0, 1.0)


def bald(p_heads: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    total = _binary_entropy_bits(p_heads.mean(axis=-1))
    expected = _binary_entropy_bits(p_heads).mean(axis=-1)
    return np.clip(total - expected, 0.0, 1.0)


def random(p_heads: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng or np.random.default_rng()
    return rng.random(p_heads.shape[0])


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "random": random,
    "entropy": entropy,
    "margin": margin,
    "variance": variance,
    "bald": bald,
}
# ``batch`` (trainer.selection, the default) picks by margin, discounted for near-duplicates in
# a batch; one pair on its own is worth its margin. As batch-aware selection's value, margin
# needed fewer labels than BALD on 3 of 6 benchmark runs, as many on 2, more on 1 (BENCHMARKS.md).
BATCH_VALUE = "margin"


def acquisition(name: str) -> Callable[..., np.ndarray]:
    """The acquisition function called ``name`` (``default`` is the measured best)."""
    name = BATCH_VALUE if name in ("default", "batch") else name
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}, batch or default"
        )
    return STRATEGIES[name]
