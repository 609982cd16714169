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

The ensemble's spread is a weak stand-in for what the model does not know (heads that share one
frozen backbone agree or disagree for reasons of their own). :class:`Posterior` is the one that
means something: a Laplace posterior over the weights of a linear Bradley–Terry reward on the
layer-normed embeddings, ``r(e) = w · LN(e)``, so a pair (a, b) has the feature
``x = LN(e_a) - LN(e_b)`` and a Gaussian logit ``N(mu, x^T Sigma x)``.
:func:`information_gain` is the expected information a label carries about ``w`` under it
(BALD for a Gaussian logit): large where the posterior is wide, near zero on a pair the labels
already pinned down, however close to a coin flip that pair is. A coin flip between two
equally good replies is noise, not something to learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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
    return rng.random(len(p_heads))


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "random": random,
    "entropy": entropy,
    "margin": margin,
    "variance": variance,
    "bald": bald,
}
# ``batch`` (rlhf_core.selection) picks by margin, discounted for near-duplicates in a batch; one
# pair on its own is worth its margin. ``acquisition("default")`` is that single-pair value; the
# selection default (``mixed``, rlhf_core.selection) measures against the Laplace posterior.
BATCH_VALUE = "margin"


def acquisition(name: str) -> Callable[..., np.ndarray]:
    """The acquisition function called ``name`` (``default`` is the measured best)."""
    name = BATCH_VALUE if name in ("default", "batch") else name
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}, batch or default"
        )
    return STRATEGIES[name]


def layer_norm(emb: np.ndarray) -> np.ndarray:
    """The parameter-free layer norm the heads read embeddings through: (N, H) -> (N, H)."""
    emb = np.asarray(emb, dtype=np.float64)
    centred = emb - emb.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-5)


def pair_features(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """The feature of pairs (a, b) for a linear reward on layer-normed embeddings: (N, H)."""
    return layer_norm(emb_a) - layer_norm(emb_b)


def prior_precision(hidden_size: int, prior_scale: float) -> float:
    """Precision of the weights before any label: that of the heads' random prior functions
    (``prior_scale`` times weights of variance 1/H), so the posterior starts as wide as the
    ensemble does."""
    return hidden_size / max(prior_scale, 1.0) ** 2


@dataclass
class Posterior:
    """Laplace posterior over a linear Bradley–Terry reward's weights: precision ``A`` (D, D).

    ``A = lambda I + sum_i p_i (1 - p_i) x_i x_i^T`` over the labelled pairs' features ``x_i``
    and the model's probabilities ``p_i`` on them (the Hessian of the negative log posterior).
    """

    precision: np.ndarray  # (D, D)
    _covariance: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def prior(cls, dim: int, precision: float) -> Posterior:
        return cls(np.eye(dim) * precision)

    @classmethod
    def fit(cls, features: np.ndarray, p: np.ndarray, precision: float) -> Posterior:
        """The posterior after the labelled pairs ``features`` (N, D), at probabilities ``p``."""
        x = np.asarray(features, dtype=np.float64)
        weight = np.clip(p * (1.0 - p), 1e-4, 0.25)
        return cls(logistic_hessian(x, weight, precision))

    def covariance(self) -> np.ndarray:
        """``A^-1`` (D, D), computed once per posterior (callers must not modify it)."""
        if self._covariance is None:
            self._covariance = np.linalg.inv(self.precision)
        return self._covariance

    def variance(self, features: np.ndarray) -> np.ndarray:
        """The posterior variance of each pair's logit, ``x^T A^-1 x``: (N,)."""
        x = np.asarray(features, dtype=np.float64)
        return np.einsum("nd,nd->n", x @ self.covariance(), x)


# A logistic sigmoid(z) is close to the probit Phi(z * sqrt(pi / 8)) (MacKay 1992).
_PROBIT = math.pi / 8.0
_BALD_C2 = math.pi * LN2 / 2.0  # C^2 in Houlsby et al. 2011, eq. 4


def information_gain(mean_logit: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Expected information (bits) a label on each pair carries about the weights, for a logit
    ``N(mean_logit, variance)``: H[y] - E_w H[y | w] (Houlsby et al. 2011), in [0, 1]."""
    mu = np.asarray(mean_logit, dtype=np.float64)
    s2 = _PROBIT * np.maximum(np.asarray(variance, dtype=np.float64), 0.0)
    mu2 = _PROBIT * mu**2
    total = _binary_entropy_bits(1.0 / (1.0 + np.exp(-np.abs(mu) / np.sqrt(1.0 + s2))))
    expected = np.sqrt(_BALD_C2 / (s2 + _BALD_C2)) * np.exp(-mu2 / (2.0 * (s2 + _BALD_C2)))
    return np.clip(total - expected, 0.0, 1.0)


def fit_logistic(
    features: np.ndarray,
    targets: np.ndarray,
    precision: float,
    steps: int = 8,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The posterior mode of a linear Bradley–Terry reward, ``P(chosen) = sigmoid(w · x)``,
    under the prior ``N(0, I / precision)``: Newton's method, (N, D) -> (D,). ``weights`` (N,):
    what each label counts (default 1)."""
    x = np.asarray(features, dtype=np.float64)
    c = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (c * (p - targets)) + precision * w
        hessian = logistic_hessian(x, c * p * (1 - p), precision)
        w = w - np.linalg.solve(hessian, gradient)
    return w


def logistic_hessian(features: np.ndarray, curvature: np.ndarray, precision: float) -> np.ndarray:
    """``lambda I + sum_i c_i x_i x_i^T``: the negative log posterior's Hessian, (D, D)."""
    x = np.asarray(features, dtype=np.float64)
    return (x * curvature[:, None]).T @ x + precision * np.eye(x.shape[1])


def brier_loss(w: np.ndarray, features: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error of ``sigmoid(w · x)`` against ``targets``: a proper score that, unlike
    log-loss, one confidently wrong label cannot dominate."""
    p = 1.0 / (1.0 + np.exp(-(np.asarray(features) @ w)))
    return float(((p - targets) ** 2).mean())
