"""The policy leaderboard: a Bradley–Terry fit over policy versions from human choices.

Each comparison is one human verdict on two responses written by two policy versions
(:mod:`rlhf_core.arena`). The model is a logistic regression, as Chatbot Arena fits it:

    P(a beats b) = σ(θ_a − θ_b + γ · Δlen),   Δlen = (len_a − len_b) / (len_a + len_b)

``θ`` is a version's strength; ``γ`` is the pull of length alone ("style control"), so a version
that merely writes longer answers does not climb the board for it. Ties count as half a win each
way. A weak Gaussian prior (``alpha · ‖β‖²``, the same penalty as ``choix.opt_pairwise``) keeps
the fit finite when a version has won every comparison, and centres the strengths on zero.
Confidence intervals are percentiles of a bootstrap over comparisons. Ratings are shown on the
familiar Elo scale: ``1000 + 400 · θ / ln 10``.

>>> board = leaderboard([Comparison("policy-0001", "policy-base", 1.0, 40, 40)] * 8
...                     + [Comparison("policy-0001", "policy-base", 0.0, 40, 40)] * 2)
>>> [(row["policy"], row["comparisons"], row["wins"]) for row in board["rows"]]
[('policy-0001', 10, 8.0), ('policy-base', 10, 2.0)]
>>> board["rows"][0]["rating"] > 1000 > board["rows"][1]["rating"]
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTRE = 1000.0
PRIOR_ALPHA = 0.05  # choix's `alpha`: Gaussian prior with variance 1/(2·alpha) on each parameter
BOOTSTRAP_ROUNDS = 200


@dataclass(frozen=True)
class Comparison:
    """One human verdict: ``outcome`` is 1 when ``a`` won, 0 when ``b`` won, 0.5 for a tie."""

    a: str
    b: str
    outcome: float
    length_a: int
    length_b: int


def length_feature(length_a: np.ndarray, length_b: np.ndarray) -> np.ndarray:
    """Relative length difference in [−1, 1] (0 for two empty responses)."""
    total = np.maximum(length_a + length_b, 1)
    return (length_a - length_b) / total


def fit_bradley_terry(
    a: np.ndarray,
    b: np.ndarray,
    outcome: np.ndarray,
    n_items: int,
    covariates: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    alpha: float = PRIOR_ALPHA,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """MAP fit by Newton's method: strengths (n_items,) followed by covariate coefficients.

    ``a``, ``b``: item indices of each comparison (n,); ``outcome``: P(a wins) targets in [0, 1];
    ``covariates``: (n, k) features of each comparison; ``weights``: (n,) counts (a bootstrap
    resample). Minimises ``−Σ w·loglik + alpha·‖β‖²``, choix's objective when k = 0. Gradient and
    Hessian are summed per item with ``bincount`` (no (n, V) design matrix).
    """
    n = len(a)
    x = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
    size = n_items + x.shape[1]
    w = np.ones(n) if weights is None else weights
    beta = np.zeros(size) if start is None else start.copy()
    items = np.arange(n_items)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(beta[a] - beta[b] + x @ beta[n_items:])))  # (n,)
        residual, curvature = w * (p - outcome), w * p * (1.0 - p)  # (n,) each
        gradient = 2.0 * alpha * beta
        gradient[:n_items] += _per_item(a, b, residual, n_items)
        gradient[n_items:] += x.T @ residual
        hessian = 2.0 * alpha * np.eye(size)
        pairs = np.bincount(a * n_items + b, curvature, n_items * n_items)
        pairs = pairs.reshape(n_items, n_items)
        hessian[:n_items, :n_items] -= pairs + pairs.T
        hessian[items, items] += np.bincount(a, curvature, n_items)
        hessian[items, items] += np.bincount(b, curvature, n_items)
        for j in range(x.shape[1]):
            column = _per_item(a, b, curvature * x[:, j], n_items)
            hessian[:n_items, n_items + j] = hessian[n_items + j, :n_items] = column
        hessian[n_items:, n_items:] += (x * curvature[:, None]).T @ x
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def _per_item(a: np.ndarray, b: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    """Σ values over the comparisons an item is ``a`` in, minus over those it is ``b`` in."""
    return np.bincount(a, values, n_items) - np.bincount(b, values, n_items)


def leaderboard(
    comparisons: Sequence[Comparison],
    style_control: bool = True,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Rows ``{"policy", "rating", "ci_low", "ci_high", "comparisons", "wins"}``, best first,
    and the fitted length coefficient (``None`` without style control or comparisons)."""
    if not comparisons:
        return {"rows": [], "length_coefficient": None, "length_ci": None}
    policies = sorted({c.a for c in comparisons} | {c.b for c in comparisons})
    index = {policy: i for i, policy in enumerate(policies)}
    a = np.array([index[c.a] for c in comparisons])
    b = np.array([index[c.b] for c in comparisons])
    outcome = np.array([c.outcome for c in comparisons], dtype=float)
    covariates = None
    if style_control:
        covariates = length_feature(
            np.array([c.length_a for c in comparisons], dtype=float),
            np.array([c.length_b for c in comparisons], dtype=float),
        )
    fit = fit_bradley_terry(a, b, outcome, len(policies), covariates)
    rng = np.random.default_rng(seed)
    resampled = np.stack(
        [
            fit_bradley_terry(
                a,
                b,
                outcome,
                len(policies),
                covariates,
                weights=rng.multinomial(len(a), np.full(len(a), 1.0 / len(a))).astype(float),
                start=fit,
            )
            for _ in range(rounds)
        ]
    )  # (rounds, V + k)
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    rows: list[dict[str, Any]] = []
    for policy, i in index.items():
        involved = (a == i) | (b == i)
        wins = np.where(a == i, outcome, 1.0 - outcome)[involved].sum()
        rows.append(
            {
                "policy": policy,
                "rating": _elo(fit[i]),
                "ci_low": _elo(low[i]),
                "ci_high": _elo(high[i]),
                "comparisons": int(involved.sum()),
                "wins": float(wins),
                "human_win_rate": round(float(wins / involved.sum()), 4),
            }
        )
    rows.sort(key=lambda row: -row["rating"])
    n_items = len(policies)
    return {
        "rows": rows,
        "length_coefficient": round(float(fit[n_items]), 4) if style_control else None,
        "length_ci": [round(float(low[n_items]), 4), round(float(high[n_items]), 4)]
        if style_control
        else None,
    }


def _elo(theta: float) -> float:
    return round(ELO_CENTRE + ELO_SCALE * float(theta), 1)
