import numpy as np
import pytest

from rlhf_core.acquisition import Posterior, fit_logistic, prior_precision
from rlhf_core.selection import (
    AdaptiveMix,
    Candidates,
    diverse_greedy,
    information_greedy,
    pool_scores,
    rank,
    select,
)

RNG = np.random.default_rng


def candidates(p_heads, features, posterior=None) -> Candidates:
    features = np.asarray(features, dtype=float)
    dim = features.shape[1]
    return Candidates(
        np.asarray(p_heads, dtype=float), features, posterior or Posterior.prior(dim, 1.0)
    )


def test_diverse_greedy_skips_a_near_duplicate_of_its_first_pick():
    value = np.array([1.0, 0.95, 0.6])
    features = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])  # 1 nearly repeats 0
    picked, gains = diverse_greedy(value, features, 3)
    assert picked == [0, 2, 1]
    assert gains[0] == pytest.approx(1.0) and gains[1] == pytest.approx(0.6)
    assert gains == sorted(gains, reverse=True)


def test_eig_prefers_an_unlabelled_region_to_a_coin_flip_it_has_already_labelled():
    # 200 labels along feature 0, half each way: the model is sure that pair is a coin flip.
    labelled = np.zeros((200, 2))
    labelled[:, 0] = 1.0
    posterior = Posterior.fit(labelled, np.full(200, 0.5), precision=1.0)
    # Candidate 0: that coin flip again (mean exactly 0.5). Candidate 1: an unexplored direction
    # whose mean leans a little (0.6), so margin and entropy prefer candidate 0.
    pool = candidates([[0.5, 0.5], [0.6, 0.6]], [[1.0, 0.0], [0.0, 1.0]], posterior)
    assert select("eig", pool, 1, RNG(0)) == [1]
    assert select("margin", pool, 1, RNG(0)) == [0]


def test_eig_batch_does_not_spend_two_labels_on_near_duplicates():
    # Pairs 0 and 1 are the same question; pair 2 is a different one, a little less uncertain.
    pool = candidates(
        [[0.5, 0.5], [0.5, 0.5], [0.55, 0.55]],
        [[3.0, 0.0], [3.0, 0.01], [0.0, 2.9]],
    )
    picked, gains = information_greedy(pool, 3)
    assert picked[0] in (0, 1) and picked[1] == 2
    assert gains == sorted(gains, reverse=True)


def test_pool_scores_order_the_pool_as_the_batch_selection_picks_it():
    rng = RNG(0)
    features = rng.normal(size=(50, 8))
    p_heads = rng.random((50, 4))
    features[7] = features[0] * 1.001  # a near-duplicate
    for strategy in ("batch", "eig", "adaptive"):
        pool = candidates(p_heads, features)
        scores = pool_scores(strategy, pool)
        picked, _ = rank(strategy, pool, 50, RNG(0))
        assert list(np.argsort(scores, kind="stable")) == picked, strategy
        assert ((scores >= 0.0) & (scores <= 1.0)).all()
        assert len(set(np.round(scores, 6))) == 50  # no ties the Data Manager could reorder


def test_pool_scores_beyond_the_limit_come_after_every_pick():
    rng = RNG(1)
    pool = candidates(rng.random((30, 4)), rng.normal(size=(30, 4)))
    scores = pool_scores("eig", pool, limit=5)
    picked, _ = rank("eig", pool, 5, RNG(0))
    rest = np.setdiff1d(np.arange(30), picked)
    assert list(np.argsort(scores, kind="stable")[:5]) == picked
    assert scores[rest].min() > scores[picked].max()


@pytest.mark.parametrize("strategy", ["bald", "entropy", "margin", "variance"])
def test_pool_scores_of_a_single_pair_strategy_are_one_minus_its_value(strategy):
    from rlhf_core.acquisition import STRATEGIES

    p_heads = np.array([[0.2, 0.3], [0.5, 0.9], [0.4, 0.6]])
    pool = candidates(p_heads, np.ones((3, 2)))
    np.testing.assert_allclose(pool_scores(strategy, pool), 1.0 - STRATEGIES[strategy](p_heads))


def test_select_with_batch_picks_the_greedy_order():
    # Margins 1.0, 0.98, 0.8, 0.4; the second pair is a near-duplicate of the first.
    p_heads = np.array([[0.4, 0.6], [0.5, 0.52], [0.6, 0.6], [0.8, 0.8]])
    features = np.array([[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [0.7, 0.7]])
    pool = candidates(p_heads, features)
    assert select("batch", pool, 2, RNG(0)) == [0, 2]
    assert select("margin", pool, 2, RNG(0)) == [0, 1]


def test_adaptive_mixes_in_as_many_random_picks_as_its_share_says():
    rng = RNG(2)
    pool = candidates(rng.random((100, 4)), rng.normal(size=(100, 6)))
    informative = set(select("eig", pool, 10, RNG(0)))
    picked = select("adaptive", pool, 10, RNG(0), AdaptiveMix(share=0.5))
    assert len(set(picked)) == 10
    assert len(informative & set(picked)) == 5
    assert select("adaptive", pool, 10, RNG(0), AdaptiveMix(share=0.0)) == select(
        "eig", pool, 10, RNG(0)
    )


def _labelled_history(informative_pays: bool, seed: int = 0):
    """Two batches of labels on a world whose truth is a linear rule. Random picks follow it
    with 10% noise. Informative picks either are pure coin flips (uncertainty bought nothing) or
    follow the rule without noise on larger-margin pairs."""
    rng = RNG(seed)
    dim = 12
    w = rng.normal(size=dim)
    parts, random_pick, new = [], [], []
    for batch, size in ((0, 100), (1, 100)):
        for is_random in (True, False):
            x = rng.normal(size=(size, dim)) * (1.0 if is_random or not informative_pays else 2.0)
            if is_random:
                p_first = np.where(x @ w > 0, 0.9, 0.1)
            else:
                p_first = np.where(x @ w > 0, 1.0, 0.0) if informative_pays else np.full(size, 0.5)
            first_wins = rng.random(size) < p_first
            parts.append(np.where(first_wins[:, None], x, -x))  # oriented chosen - rejected
            random_pick += [is_random] * size
            new += [batch == 1] * size
    return np.concatenate(parts), np.array(random_pick), np.array(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_shifts_toward_random_when_uncertainty_does_not_pay(seed):
    features, random_pick, new = _labelled_history(informative_pays=False, seed=seed)
    mix = AdaptiveMix(share=0.5)
    assert mix.update(features, np.ones(len(features)), random_pick, new) > 0.5


def test_fit_logistic_recovers_a_separating_rule():
    rng = RNG(3)
    x = rng.normal(size=(400, 5))
    w_true = np.array([2.0, -1.0, 0.0, 0.5, 1.0])
    x = np.where((x @ w_true > 0)[:, None], x, -x)  # every pair oriented as the rule says
    w = fit_logistic(x, np.ones(400), precision=prior_precision(5, 4.0))
    assert (x @ w > 0).mean() > 0.97
