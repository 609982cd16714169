"""Choosing which pairs humans label next: one function for the simulator, the pool order and
``/predict``.

:func:`rank` orders candidate pairs, best first, and says what each was worth at its place;
:func:`select` takes the first ``k`` (the simulator's next batch) and :func:`pool_scores` turns
the order into Label Studio scores (lowest first), for the pre-annotation job's pool order and
for ``/predict``. There is no separate cold-start path: with no labels the posterior is the
prior, and the same code picks a batch spread over the pool.

Strategies:

* ``eig``: greedy expected information gain under the Laplace posterior
  (:class:`rlhf_core.acquisition.Posterior`). After each pick the posterior is updated as if that
  pair were labelled (a rank-one update of the covariance, weight ``p(1 - p)``), so the next pick
  is what is still unknown *given the batch so far*: a greedy D-optimal batch design. A
  near-duplicate of a picked pair, or a second pair in a region the batch already covers, loses
  its value; a close pair the posterior is already sure is a coin flip has none.
* ``batch``: greedy on the ensemble's margin, discounted by cosine similarity to pairs already
  picked (the default until the world-family benchmark showed it spending labels on coin flips).
* ``random``, ``entropy``, ``margin``, ``variance``, ``bald``: one value per pair
  (:mod:`rlhf_core.acquisition`), best first.
* ``mixed`` (the default): half of every batch is ``eig``'s first picks, the other half drawn
  uniformly at random from the rest, spread evenly among them (in the pool order too, so any
  stretch of it a team labels holds its random share). The informative half buys what ``eig``
  buys where information pays; the random half bounds the loss where it does not (on a world
  where informative labels teach nothing, the mixture still has half random's labels) and keeps
  the labelled set an unbiased sample of the pool, which a reward model trained on it and a
  gate evaluated on it both need. Stateless: the service needs nothing carried between retrains.
* ``adaptive`` (:class:`AdaptiveMix`): the same mixture with a share moved by what each batch
  bought; it needs its share carried from batch to batch, which the simulator does and the
  service does not (it would start every pool order at the initial share); on the benchmark its
  per-batch signal was too noisy to move the share usefully (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rlhf_core.acquisition import (
    EPS,
    STRATEGIES,
    Posterior,
    brier_loss,
    fit_logistic,
    information_gain,
    margin,
    pair_features,
    prior_precision,
)

SELECTION_STRATEGIES = (*STRATEGIES, "batch", "eig", "adaptive", "mixed")
DEFAULT_SELECTION = "mixed"
BATCH_AWARE = ("batch", "eig", "adaptive", "mixed")  # a pick's value depends on the picks before it
# ``mixed``: the share of every batch (and of every stretch of the pool order) picked at random.
MIXED_RANDOM_SHARE = 0.5
# Label Studio's pool is ordered batch-aware for this many tasks (a greedy step costs O(N · D)):
# far more than a team labels between two retrains, which re-score the pool.
POOL_ORDER_LIMIT = 2000
SCORE_STEP = 1e-6  # the resolution of a prediction's score (rounded to 6 decimals)


def resolve(name: str) -> str:
    name = DEFAULT_SELECTION if name == "default" else name
    if name not in SELECTION_STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(SELECTION_STRATEGIES)}, default"
        )
    return name


@dataclass
class Candidates:
    """What selection sees of P candidate pairs (a, b).

    ``p_heads`` (P, K): each head's P(a beats b); ``features`` (P, D): ``LN(e_a) - LN(e_b)``
    (:func:`rlhf_core.acquisition.pair_features`); ``posterior``: the reward model's Laplace
    posterior over the weights of a linear reward on those features.
    """

    p_heads: np.ndarray
    features: np.ndarray
    posterior: Posterior

    def __len__(self) -> int:
        return len(self.p_heads)

    def mean_logit(self) -> np.ndarray:
        p = np.clip(self.p_heads, EPS, 1 - EPS)
        return np.log(p / (1 - p)).mean(axis=1)

    def subset(self, index: np.ndarray) -> Candidates:
        return Candidates(self.p_heads[index], self.features[index], self.posterior)


@dataclass
class AdaptiveMix:
    """How much of each batch ``adaptive`` spends on ``eig`` picks, the rest going to random.

    After each batch, :meth:`update` is told the labels that arrived and compares what the
    informative picks and the random picks each bought: how much each part, added to a Laplace
    fit on the labels before the batch, reduces the squared error on earlier random picks (the
    only unbiased sample of the pool a team has; two folds, each half the yardstick once). When
    informative labels buy less per label than random ones, summed over the batches so far, the
    random share grows by ``step``; otherwise it shrinks, never below ``floor`` (the
    measurement needs random labels).
    """

    share: float = 0.5  # fraction of a batch picked at random
    floor: float = 0.2
    step: float = 0.15
    history: list[dict[str, float]] = field(default_factory=list)

    def split(self, k: int) -> int:
        """Random picks in a batch of ``k``."""
        return round(self.share * k)

    def update(
        self, features: np.ndarray, targets: np.ndarray, random_pick: np.ndarray, new: np.ndarray
    ) -> float:
        """Move the share after a batch; returns the new share.

        ``features`` (N, D): every labelled pair's feature, oriented chosen minus rejected;
        ``targets`` (N,): 1, or 0.5 for a tie; ``random_pick`` (N,): picked at random;
        ``new`` (N,): arrived in the latest batch.
        """
        old = ~new
        informative, random_new = new & ~random_pick, new & random_pick
        yardstick = np.flatnonzero(random_pick & old)
        if len(yardstick) < 2 or not informative.any() or not random_new.any():
            return self.share
        precision = prior_precision(features.shape[1], 4.0)
        gains = {"informative": 0.0, "random": 0.0}
        # Two folds of the earlier random labels: each half is the yardstick once, the model
        # before the batch is fitted on everything else that came before.
        for fold in (yardstick[0::2], yardstick[1::2]):
            held = np.zeros(len(features), dtype=bool)
            held[fold] = True
            before = old & ~held
            base = fit_logistic(features[before], targets[before], precision)
            base_loss = brier_loss(base, features[held], targets[held])
            for name, part in (("informative", informative), ("random", random_new)):
                after = before | part
                w = fit_logistic(features[after], targets[after], precision)
                loss = brier_loss(w, features[held], targets[held])
                gains[name] += (base_loss - loss) / part.sum() / 2.0
        self.history.append({**gains, "share": self.share})
        informative_total = sum(h["informative"] for h in self.history)
        random_total = sum(h["random"] for h in self.history)
        direction = 1.0 if informative_total < random_total else -1.0
        self.share = float(np.clip(self.share + direction * self.step, self.floor, 1.0))
        return self.share


def information_greedy(candidates: Candidates, k: int) -> tuple[list[int], list[float]]:
    """Greedy expected information gain with rank-one posterior updates: picks and gains.

    The gains never increase (each update only narrows the posterior), so they can be turned
    into scores that sort like the picks.
    """
    x = np.asarray(candidates.features, dtype=np.float64)  # (P, D)
    mu = candidates.mean_logit()  # (P,)
    cov = candidates.posterior.covariance()  # (D, D)
    var = np.einsum("pd,pd->p", x @ cov, x)  # (P,)
    fisher = np.clip(1.0 / (1.0 + np.exp(-mu)), EPS, 1 - EPS)
    fisher = fisher * (1.0 - fisher)  # (P,) the weight a label on that pair would get
    available = np.ones(len(x), dtype=bool)
    picked: list[int] = []
    gains: list[float] = []
    for _ in range(min(k, len(x))):
        gain = np.where(available, information_gain(mu, var), -np.inf)
        best = int(np.argmax(gain))
        picked.append(best)
        gains.append(float(gain[best]))
        available[best] = False
        u = cov @ x[best]  # (D,)
        denom = 1.0 / fisher[best] + float(x[best] @ u)
        var = np.maximum(var - (x @ u) ** 2 / denom, 0.0)
        cov = cov - np.outer(u, u) / denom
    return picked, gains


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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


def rank(
    strategy: str,
    candidates: Candidates,
    k: int,
    rng: np.random.Generator,
    mix: AdaptiveMix | None = None,
) -> tuple[list[int], list[float]]:
    """The first ``k`` candidates in the order ``strategy`` would have them labelled, and the
    value (in [0, 1]) each was picked at. The one selection function: the simulator's batches,
    the pool order after a promotion and ``/predict``'s scores all come from here.

    For ``adaptive``, ``mix`` (default: a fresh :class:`AdaptiveMix`) says how many of the
    ``k`` go to random picks; they are placed evenly among the informative ones, at the value
    of the informative pick before them.
    """
    strategy = resolve(strategy)
    k = min(k, len(candidates))
    if strategy == "random":
        order = rng.permutation(len(candidates))[:k]
        return [int(i) for i in order], [float(v) for v in rng.random(k)]
    if strategy == "eig":
        return information_greedy(candidates, k)
    if strategy == "batch":
        return diverse_greedy(margin(candidates.p_heads), candidates.features, k)
    if strategy == "mixed":
        return _mixture(candidates, k, rng, MIXED_RANDOM_SHARE)
    if strategy == "adaptive":
        return _mixture(candidates, k, rng, (mix or AdaptiveMix()).share)
    value = STRATEGIES[strategy](candidates.p_heads, rng)
    order = np.argsort(-value, kind="stable")[:k]
    return [int(i) for i in order], [float(value[i]) for i in order]


def random_slots(k: int, n_random: int) -> set[int]:
    """The positions of a batch of ``k`` that ``adaptive`` fills at random, spread evenly."""
    return {int((i + 0.5) * k / n_random) for i in range(n_random)} if n_random else set()


def _mixture(
    candidates: Candidates, k: int, rng: np.random.Generator, share: float
) -> tuple[list[int], list[float]]:
    """``eig`` picks with ``round(share * k)`` random picks spread evenly among them; a random
    pick is valued at the informative pick before it, so the scores still sort like the order."""
    n_random = round(share * k)
    picked, gains = information_greedy(candidates, k - n_random)
    rest = np.setdiff1d(np.arange(len(candidates)), picked)
    randoms = iter(rng.choice(rest, size=min(n_random, len(rest)), replace=False).tolist())
    slots = random_slots(k, n_random)
    informative = iter(zip(picked, gains))
    order: list[int] = []
    values: list[float] = []
    value = gains[0] if gains else 1.0
    for position in range(k):
        item = None if position in slots else next(informative, None)
        if item is None:
            index = next(randoms, None)
            if index is None:
                break
            order.append(int(index))
        else:
            order.append(item[0])
            value = item[1]
        values.append(value)
    return order, values


def select(
    strategy: str,
    candidates: Candidates,
    k: int,
    rng: np.random.Generator,
    mix: AdaptiveMix | None = None,
) -> list[int]:
    """Indices of the ``k`` candidate pairs to label next."""
    return rank(strategy, candidates, k, rng, mix)[0]


def pool_scores(
    strategy: str,
    candidates: Candidates,
    rng: np.random.Generator | None = None,
    limit: int = POOL_ORDER_LIMIT,
    mix: AdaptiveMix | None = None,
) -> np.ndarray:
    """Label Studio scores for a pool of tasks (one candidate pair each), lowest = label first.

    The first ``limit`` tasks of :func:`rank`'s order score ``1 − the value they were picked
    at`` (never decreasing along the order), the rest score just above the last of them, so the
    Data Manager's ascending sort shows the tasks in the order the strategy picks them.
    """
    rng = rng or np.random.default_rng(0)
    scores = np.ones(len(candidates))
    if not len(candidates):
        return scores
    if resolve(strategy) not in BATCH_AWARE:  # one value per pair: its order is the value's
        return 1.0 - np.clip(pair_values(strategy, candidates, rng), 0.0, 1.0)
    picked, values = rank(strategy, candidates, limit, rng, mix)
    ordered = np.maximum.accumulate(1.0 - np.clip(np.asarray(values), 0.0, 1.0))
    # Strictly increasing (at the scores' resolution), so the sort cannot reorder equal scores.
    steps = SCORE_STEP * np.arange(len(ordered))
    ordered = np.minimum(steps + np.maximum.accumulate(ordered - steps), 1.0)
    rest = np.ones(len(candidates), dtype=bool)
    rest[picked] = False
    scores[rest] = np.minimum(ordered[-1] + SCORE_STEP, 1.0)
    scores[picked] = ordered
    return scores


def pair_values(
    strategy: str, candidates: Candidates, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Each pair's value on its own (no batch), in [0, 1]: what picks a task's pair."""
    strategy = resolve(strategy)
    if strategy in ("eig", "adaptive", "mixed"):
        variance = candidates.posterior.variance(candidates.features)
        return information_gain(candidates.mean_logit(), variance)
    if strategy == "batch":
        return margin(candidates.p_heads)
    return STRATEGIES[strategy](candidates.p_heads, rng or np.random.default_rng(0))


def task_pairs(
    strategy: str,
    head_rewards: np.ndarray,
    embeddings: np.ndarray,
    posterior: Posterior,
    rng: np.random.Generator | None = None,
) -> tuple[list[tuple[int, int]], Candidates, np.ndarray]:
    """One task's response pairs (i < j), as :class:`Candidates`, with each pair's value.

    ``head_rewards`` (n, K): each head's reward per response; ``embeddings`` (n, H)."""
    n = head_rewards.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    left, right = [i for i, _ in pairs], [j for _, j in pairs]
    p_heads = 1.0 / (1.0 + np.exp(-(head_rewards[left] - head_rewards[right])))  # (P, K)
    candidates = Candidates(p_heads, pair_features(embeddings[left], embeddings[right]), posterior)
    return pairs, candidates, pair_values(strategy, candidates, rng)


def score_tasks(
    strategy: str,
    tasks: list[tuple[np.ndarray, np.ndarray]],
    posterior: Posterior,
    limit: int = POOL_ORDER_LIMIT,
    mix: AdaptiveMix | None = None,
    another_look: Sequence[bool] | None = None,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Scores for a pool of tasks, lowest = label first: what ``/predict`` answers and the
    order the pre-annotation job writes. ``tasks``: per task, its responses' per-head rewards
    (n, K) and embeddings (n, H). Each task is represented by its most valuable pair (returned,
    as indices into its responses); the pool is then ordered by :func:`rank`. Deterministic:
    the same pool gets the same scores in ``/predict`` and in the pool order.
    ``another_look``: per task, whether its labels call for another annotation
    (:func:`rlhf_core.reliability.needs_another_look`); those come first (:func:`looks_first`)."""
    rng = np.random.default_rng(0)
    best_pairs: list[tuple[int, int]] = []
    p_rows, f_rows = [], []
    for head_rewards, embeddings in tasks:
        pairs, candidates, value = task_pairs(strategy, head_rewards, embeddings, posterior, rng)
        best = int(np.argmax(value))
        best_pairs.append(pairs[best])
        p_rows.append(candidates.p_heads[best])
        f_rows.append(candidates.features[best])
    if not tasks:
        return [], np.zeros(0)
    pool = Candidates(np.stack(p_rows), np.stack(f_rows), posterior)
    scores = pool_scores(strategy, pool, rng, limit, mix)
    return best_pairs, looks_first(scores, another_look)


def looks_first(scores: np.ndarray, another_look: Sequence[bool] | None) -> np.ndarray:
    """Tasks whose annotators disagree, or whose one label the model strongly contradicts, score
    0 and every other task at least ``SCORE_STEP``: Label Studio shows them first, for another
    annotation, whatever the strategy thought of them."""
    if another_look is None or not any(another_look):
        return scores
    return np.where(np.asarray(another_look, dtype=bool), 0.0, np.maximum(scores, SCORE_STEP))
