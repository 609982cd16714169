import numpy as np
import pytest

from rlhf_core.acquisition import acquisition, bald, entropy, margin, variance


def test_confident_agreeing_heads_score_near_zero_everywhere():
    p = np.full((1, 4), 0.999)
    for fn in (entropy, margin, variance, bald):
        assert fn(p)[0] < 0.02


def test_disagreeing_heads_have_high_bald_and_variance_but_coin_flip_mean():
    split = np.array([[0.01, 0.99, 0.01, 0.99]])
    agreed_coin = np.array([[0.5, 0.5, 0.5, 0.5]])
    assert bald(split)[0] > 0.8 and variance(split)[0] > 0.9
    # both are coin flips on average: total uncertainty is maximal for both ...
    assert entropy(split)[0] == pytest.approx(1.0) and entropy(agreed_coin)[0] == pytest.approx(1.0)
    # ... but only disagreement is epistemic: a label resolves it
    assert bald(agreed_coin)[0] == pytest.approx(0.0, abs=1e-6)
    assert variance(agreed_coin)[0] == pytest.approx(0.0)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="bald"):
        acquisition("smart")


def test_default_is_a_known_strategy():
    assert acquisition("default") in {entropy, margin, variance, bald}


def test_config_accepts_exactly_the_known_strategies():
    from rlhf_core.config import STRATEGY_NAMES
    from rlhf_core.selection import SELECTION_STRATEGIES

    assert set(STRATEGY_NAMES) == {*SELECTION_STRATEGIES, "default"}


def test_a_batch_selection_values_one_pair_at_its_margin_and_is_the_default():
    assert acquisition("batch") is margin
    assert acquisition("default") is acquisition("batch")
