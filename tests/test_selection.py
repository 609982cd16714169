import numpy as np
import pytest

from trainer.selection import diverse_greedy, pool_scores, select


def test_diverse_greedy_skips_a_near_duplicate_of_its_first_pick():
    value = np.array([1.0, 0.95, 0.6])
    features = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])  # 1 nearly repeats 0
    picked, gains = diverse_greedy(value, features, 3)
    assert picked == [0, 2, 1]
    assert gains[0] == pytest.approx(1.0) and gains[1] == pytest.approx(0.6)
    assert gains == sorted(gains, reverse=True)


def test_pool_scores_order_the_pool_as_the_batch_selection_picks_it():
    rng = np.random.default_rng(0)
    value = rng.random(50)
    features = rng.normal(size=(50, 8))
    features[7] = features[int(np.argmax(value))] * 1.001  # a near-duplicate of the best task
    value[7] = value.max() - 1e-3
    scores = pool_scores("default", value, features)
    picked, _ = diverse_greedy(value, features, 50)
    assert list(np.argsort(scores, kind="stable")) == picked
    assert scores.min() == pytest.approx(1.0 - value.max())
    assert np.argsort(scores).tolist().index(7) > 10  # the duplicate waits its turn
    assert ((scores >= 0.0) & (scores <= 1.0)).all()


def test_pool_scores_beyond_the_limit_come_after_every_pick():
    rng = np.random.default_rng(1)
    value, features = rng.random(30), rng.normal(size=(30, 4))
    scores = pool_scores("batch", value, features, limit=5)
    picked, _ = diverse_greedy(value, features, 5)
    rest = np.setdiff1d(np.arange(30), picked)
    assert list(np.argsort(scores, kind="stable")[:5]) == picked
    assert scores[rest].min() >= scores[picked].max()


@pytest.mark.parametrize("strategy", ["bald", "entropy", "margin", "variance", "random"])
def test_pool_scores_of_a_single_pair_strategy_are_one_minus_its_value(strategy):
    value = np.array([0.2, 0.9, 0.5])
    features = np.ones((3, 2))
    np.testing.assert_allclose(pool_scores(strategy, value, features), 1.0 - value)


def test_select_with_batch_picks_the_greedy_order():
    # Margins 1.0, 0.98, 0.8, 0.4; the second pair is a near-duplicate of the first.
    p_heads = np.array([[0.4, 0.6], [0.5, 0.52], [0.6, 0.6], [0.8, 0.8]])
    features = np.array([[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [0.7, 0.7]])
    rng = np.random.default_rng(0)
    assert select("batch", p_heads, features, 2, rng, cold_start=False) == [0, 2]
    assert select("margin", p_heads, features, 2, rng, cold_start=False) == [0, 1]
