"""Annotator reliability: whom to trust, from gold, overlaps and agreement with the model.

Each annotator ``a`` gets one number, ``q_a``: the probability that their label on a pair names
the truly better response (one-coin Dawid–Skene, Dawid & Skene 1979). ``q = 0.5`` is a random
clicker, ``q < 0.5`` someone who systematically inverts A and B. Three kinds of evidence move it:

* **gold**: a pair whose task has an annotation Label Studio marks ``ground_truth`` has a known
  answer;
* **overlaps**: other annotators' labels on the same pair, each counted by its own ``q``;
* **the model**: a linear Bradley–Terry reward on the frozen embeddings (the Laplace model
  selection uses, :func:`rlhf_core.acquisition.fit_logistic`), fitted *without* the annotator's
  own labels (annotators are split into at most ``max_folds`` folds; the model that judges a
  fold never saw it), so that nobody vouches for themselves. This is what works in the hard
  case: every pair labelled once, no gold, opaque ids. A swapper's labels are consistent with
  each other and inverted against a model learnt from everyone else; a random clicker's agree
  with it half of the time.

EM alternates: the item posteriors given every label and the model's predictive probability
(E), then each ``q_a`` as the Beta-prior posterior mean of their labels' chance of being right
(M); the fold models are then refitted with the new weights (and the swappers' labels turned
round) and the EM runs again, ``rounds`` times.

What training does with it (:meth:`Reliability.weigh`): a label counts ``2q - 1`` (0 for a
random clicker, 1 for a perfect annotator; the expected share of a label's gradient that
points the right way). An annotator flagged ``swapped`` (``P(q < 0.5) >= flag_confidence``) has
their labels turned round and counted ``1 - 2q``: a systematic inversion carries as much
information as a careful label, so dropping it would waste labels; the flag needs that much
evidence because a wrong flip costs twice. Without gold, nobody holding the majority of the
labels is flipped (the majority is then what defines the direction). Gold labels count 1.

Example: two careful annotators and one who always swaps, each labelling every pair once more:

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> truth = rng.normal(size=(60, 8))                       # (N, D) pair features, a wins
>>> labels = [Judgement(a, f"t{i}", True) for i in range(60) for a in ("ann", "bob")]
>>> labels += [Judgement("eve", f"t{i}", False) for i in range(60)]
>>> feats = np.concatenate([truth, truth, -truth])         # oriented as each label says
>>> result = estimate(labels, feats, precision=1.0)
>>> [(a, r.flag) for a, r in sorted(result.annotators.items())]
[('ann', ''), ('bob', ''), ('eve', 'swapped')]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rlhf_core.acquisition import fit_logistic, logistic_hessian
from rlhf_core.fields import documented

SWAPPED, CARELESS = "swapped", "careless"
GOLD_LOGIT = 9.0  # a gold answer's prior log-odds: certain, short of overflow
_PROBIT = math.pi / 8.0  # sigmoid(z) ~ Phi(z sqrt(pi/8)): the predictive's variance correction


@dataclass(frozen=True)
class ReliabilityConfig:
    prior_right: float = documented(4.0, "Beta prior pseudo-labels right (mean 4/6 = 0.67).")
    prior_wrong: float = documented(2.0, "Beta prior pseudo-labels wrong.")
    flag_confidence: float = documented(
        0.95, "Posterior probability a flag needs (q < 0.5: swapped; q < careless_below)."
    )
    careless_below: float = documented(
        0.7, "Flag as careless when q is below this with flag_confidence."
    )
    max_folds: int = documented(8, "Annotator folds: models fitted without each fold's labels.")
    rounds: int = documented(3, "Refits of the fold models with the weights learnt so far.")
    dimensions: int = documented(
        64, "The fold models see the labelled features' top principal directions, this many."
    )
    em_steps: int = documented(25, "EM iterations per round.")

    def __post_init__(self) -> None:
        if self.prior_right <= 0 or self.prior_wrong <= 0:
            raise ValueError("prior_right and prior_wrong must be positive pseudo-counts")
        if self.max_folds < 2 or self.rounds < 1 or self.em_steps < 1:
            raise ValueError("max_folds must be >= 2, rounds and em_steps >= 1")


@dataclass(frozen=True)
class Judgement:
    """One decisive label: ``annotator`` said the first response of ``item`` (a pair, in a
    canonical order) is better (``first``) or worse. ``gold``: Label Studio's ground truth."""

    annotator: str
    item: str
    first: bool
    gold: bool = False


@dataclass(frozen=True)
class AnnotatorReliability:
    annotator: str
    labels: int  # decisive labels estimated on
    reliability: float  # posterior mean of q
    interval: tuple[float, float]  # ~95% posterior interval of q
    flag: str  # "", "careless" or "swapped"
    weight: float  # what each of their labels counts in training
    gold_accuracy: float | None  # share of their labels on gold pairs that match the gold
    gold_n: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "interval": list(self.interval)}


@dataclass(frozen=True)
class Reliability:
    annotators: dict[str, AnnotatorReliability]

    @property
    def flagged(self) -> dict[str, str]:
        return {a: r.flag for a, r in sorted(self.annotators.items()) if r.flag}

    def weigh(self, pairs: Sequence[Any]) -> list[Any]:
        """``pairs`` (:class:`trainer.reward_training.Pair`) with each label's weight set and a
        flagged swapper's labels turned round; gold labels count 1."""
        weighed = []
        for pair in pairs:
            found = self.annotators.get(str(pair.annotator))
            if pair.gold or found is None:
                weighed.append(replace(pair, weight=1.0))
            elif found.flag == SWAPPED:
                turned = {"chosen": pair.rejected, "rejected": pair.chosen}
                weighed.append(replace(pair, weight=found.weight, **turned))
            else:
                weighed.append(replace(pair, weight=found.weight))
        if weighed and not any(p.weight > 0 for p in weighed):  # nobody to trust: as before
            weighed = [replace(p, weight=1.0) for p in weighed]
        return weighed

    def as_dict(self) -> dict[str, Any]:
        return {
            "annotators": {a: r.as_dict() for a, r in sorted(self.annotators.items())},
            "flagged": self.flagged,
        }


def judgements(pairs: Sequence[Any]) -> tuple[list[Judgement], np.ndarray]:
    """The decisive labels among ``pairs`` (Pair-like: annotator, group, chosen, rejected,
    tie, gold) as judgements, and the index of each in ``pairs``."""
    found, index = [], []
    for i, pair in enumerate(pairs):
        if pair.tie:
            continue
        low, high = sorted((pair.chosen, pair.rejected))
        item = f"{pair.group}\0{low}\0{high}"
        found.append(Judgement(str(pair.annotator), item, pair.chosen == low, pair.gold))
        index.append(i)
    return found, np.asarray(index, dtype=int)


def estimate_pairs(
    pairs: Sequence[Any],
    features: np.ndarray,
    precision: float,
    config: ReliabilityConfig | None = None,
) -> Reliability:
    """:func:`estimate` for reward-training pairs; ``features`` (N, D): each pair's
    ``pair_features(chosen, rejected)``, oriented as labelled."""
    found, index = judgements(pairs)
    return estimate(found, np.asarray(features)[index], precision, config)


def estimate(
    labels: Sequence[Judgement],
    features: np.ndarray,
    precision: float,
    config: ReliabilityConfig | None = None,
) -> Reliability:
    """Each annotator's reliability from ``labels`` and their ``features`` (N, D), each oriented
    as its label says (chosen minus rejected); ``precision``: the linear model's prior."""
    config = config or ReliabilityConfig()
    if not labels:
        return Reliability({})
    names = sorted({j.annotator for j in labels})
    name_index = {name: i for i, name in enumerate(names)}
    who = np.array([name_index[j.annotator] for j in labels])  # (N,)
    gold = np.array([j.gold for j in labels])
    item_index = {item: i for i, item in enumerate(sorted({j.item for j in labels}))}
    items = list(item_index)
    item_of = np.array([item_index[j.item] for j in labels])  # (N,)
    sign = np.array([1.0 if j.first else -1.0 for j in labels])  # +1: says "first"
    gold_logit = np.zeros(len(items))
    for j in np.flatnonzero(gold):
        gold_logit[item_of[j]] = sign[j] * GOLD_LOGIT
    is_gold_item = gold_logit != 0
    rated = ~gold  # the labels each annotator is judged on (a gold label is the answer)
    fold = np.arange(len(names)) % config.max_folds  # (A,)
    counts = np.bincount(who[rated], minlength=len(names))
    # Without gold, the labels' majority is what defines which side is right: never turned.
    majority = (counts > 0.5 * counts.sum()) & (not is_gold_item.any())

    components = _principal(np.asarray(features, dtype=np.float64), config.dimensions)
    q = np.full(len(names), config.prior_right / (config.prior_right + config.prior_wrong))
    swapped = np.zeros(len(names), dtype=bool)
    right = np.zeros(len(labels))
    for _ in range(config.rounds):
        p_model = _out_of_fold(
            components, who, fold, gold, _weights(q, swapped), swapped, precision
        )
        model_logit = sign * _logit(p_model)  # (N,) in the item's "first" direction
        seen = np.maximum(np.bincount(item_of, minlength=len(items)), 1)
        prior = np.bincount(item_of, weights=model_logit, minlength=len(items)) / seen
        prior = np.where(is_gold_item, gold_logit, prior)
        for _ in range(config.em_steps):
            votes = np.where(rated, sign * _logit(q[who]), 0.0)
            posterior = _sigmoid(prior + np.bincount(item_of, votes, minlength=len(items)))
            right = np.where(sign > 0, posterior[item_of], 1.0 - posterior[item_of])  # (N,)
            q = (config.prior_right + np.bincount(who[rated], right[rated], len(names))) / (
                config.prior_right + config.prior_wrong + counts
            )
        mean, sd = _beta(config, right, who, rated, len(names))
        swapped = (_normal_cdf((0.5 - mean) / sd) >= config.flag_confidence) & ~majority

    careless = _normal_cdf((config.careless_below - mean) / sd) >= config.flag_confidence
    weights = _weights(q, swapped)
    result = {}
    for a, name in enumerate(names):
        on_gold = rated & (who == a) & is_gold_item[item_of]
        gold_right = (sign[on_gold] * gold_logit[item_of[on_gold]]) > 0
        flag = SWAPPED if swapped[a] else CARELESS if careless[a] else ""
        result[name] = AnnotatorReliability(
            annotator=name,
            labels=int(counts[a]),
            reliability=round(float(mean[a]), 4),
            interval=(
                round(max(0.0, float(mean[a] - 1.96 * sd[a])), 4),
                round(min(1.0, float(mean[a] + 1.96 * sd[a])), 4),
            ),
            flag=flag,
            weight=round(float(weights[a]), 4),
            gold_accuracy=round(float(gold_right.mean()), 4) if on_gold.any() else None,
            gold_n=int(on_gold.sum()),
        )
    return Reliability(result)


def _weights(q: np.ndarray, swapped: np.ndarray) -> np.ndarray:
    """What a label counts: 2q - 1 (at least 0), or 1 - 2q for a swapper's turned labels."""
    return np.where(swapped, 1.0 - 2.0 * q, np.maximum(2.0 * q - 1.0, 0.0))


def _out_of_fold(
    features: np.ndarray,
    who: np.ndarray,
    fold: np.ndarray,
    gold: np.ndarray,
    weights: np.ndarray,
    swapped: np.ndarray,
    precision: float,
) -> np.ndarray:
    """Each label's predictive P(its chosen response wins) under a linear Bradley–Terry model
    fitted on the other folds' labels (weighted, swappers' turned) and every gold label: (N,)."""
    x = np.asarray(features, dtype=np.float64)  # (N, k) principal components
    label_fold = fold[who]
    w = np.where(gold, 1.0, weights[who])  # (N,)
    target = np.where(gold | ~swapped[who], 1.0, 0.0)
    p = np.full(len(x), 0.5)
    for f in np.unique(label_fold):
        held = label_fold == f
        train = (~held | gold) & (w > 0)
        if not train.any():
            continue
        coef = fit_logistic(x[train], target[train], precision, weights=w[train])
        fitted = _sigmoid(x[train] @ coef)
        cov = np.linalg.inv(logistic_hessian(x[train], w[train] * fitted * (1 - fitted), precision))
        mean = x[held] @ coef
        variance = np.einsum("nd,nd->n", x[held] @ cov, x[held])
        p[held] = _sigmoid(mean / np.sqrt(1.0 + _PROBIT * variance))
    return p


def _principal(features: np.ndarray, k: int) -> np.ndarray:
    """``features`` (N, D) on their top ``k`` principal directions (uncentred, so a pair and its
    mirror image stay opposite): (N, min(k, D)). A Newton step on 384 dimensions costs a
    (384, 384) solve; the directions the labels vary along carry what agreement measures."""
    if features.shape[1] <= k:
        return features
    _, vectors = np.linalg.eigh(features.T @ features)  # ascending eigenvalues
    return features @ vectors[:, -k:]


def _beta(
    config: ReliabilityConfig, right: np.ndarray, who: np.ndarray, rated: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each annotator's Beta posterior over q."""
    a = config.prior_right + np.bincount(who[rated], right[rated], n)
    b = config.prior_wrong + np.bincount(who[rated], 1.0 - right[rated], n)
    return a / (a + b), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1.0 - 1e-6)
    return np.log(p / (1.0 - p))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


Verdict = tuple[int, int, bool]  # (chosen, rejected, tie): indices of a task's responses


def needs_another_look(
    verdicts: Sequence[Verdict], head_rewards: np.ndarray, contradiction: float
) -> bool:
    """Whether a labelled task should be shown for another annotation: two labels on the same
    pair of its responses disagree, or a pair's single decisive label is contradicted by the
    reward model (mean over heads of P(chosen beats rejected) at most ``1 - contradiction``).
    ``head_rewards`` (n, K): each head's reward per response.

    >>> rewards = np.array([[2.0, 2.2], [-1.0, -1.2]])        # the model: 0 beats 1 (p ~ 0.96)
    >>> needs_another_look([(1, 0, False)], rewards, 0.9)     # one label says 1: contradicted
    True
    >>> needs_another_look([(0, 1, False), (1, 0, False)], rewards, 0.99)  # two disagree
    True
    >>> needs_another_look([(0, 1, False)], rewards, 0.9)
    False
    """
    by_pair: dict[frozenset[int], list[tuple[int, int] | None]] = defaultdict(list)
    for chosen, rejected, tie in verdicts:
        by_pair[frozenset((chosen, rejected))].append(None if tie else (chosen, rejected))
    for given in by_pair.values():
        if len(set(given)) > 1:
            return True
        if len(given) == 1 and given[0] is not None:
            margin = head_rewards[given[0][0]] - head_rewards[given[0][1]]  # (K,)
            if float(_sigmoid(margin).mean()) <= 1.0 - contradiction:
                return True
    return False
