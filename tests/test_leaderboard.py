"""The Bradley–Terry leaderboard: agrees with choix, recovers an ordering, controls for length."""

from __future__ import annotations

import choix
import numpy as np
import pytest

from rlhf_core.leaderboard import (
    ELO_SCALE,
    PRIOR_ALPHA,
    Comparison,
    fit_bradley_terry,
    leaderboard,
)


def bt_comparisons(strengths, n, rng, lengths=lambda policy: 50):
    """``n`` human verdicts between random pairs of versions under a true Bradley–Terry model."""
    names = list(strengths)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        won = rng.random() < 1 / (1 + np.exp(-(strengths[a] - strengths[b])))
        out.append(Comparison(a, b, float(won), lengths(a), lengths(b)))
    return out


def test_the_fit_matches_choix_on_the_same_data():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=5)
    a = rng.integers(0, 5, size=300)
    b = (a + rng.integers(1, 5, size=300)) % 5
    won = rng.random(300) < 1 / (1 + np.exp(-(truth[a] - truth[b])))
    ours = fit_bradley_terry(a, b, won.astype(float), 5)
    pairs = [(x, y) if w else (y, x) for x, y, w in zip(a, b, won)]
    theirs = choix.opt_pairwise(5, pairs, alpha=PRIOR_ALPHA, tol=1e-10)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_known_ordering_is_recovered_with_intervals_that_separate_the_ends():
    strengths = {"policy-base": 0.0, "policy-0001": 0.6, "policy-0002": 1.2, "policy-0003": 1.8}
    board = leaderboard(bt_comparisons(strengths, 800, np.random.default_rng(0)))
    rows = board["rows"]
    assert [r["policy"] for r in rows] == [
        "policy-0003",
        "policy-0002",
        "policy-0001",
        "policy-base",
    ]
    best, worst = rows[0], rows[-1]
    assert best["ci_low"] > worst["ci_high"]
    for row in rows:
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]
    # The fitted spread is the true one (1.8 logits), within sampling error.
    assert (best["rating"] - worst["rating"]) / ELO_SCALE == pytest.approx(1.8, abs=0.35)
    assert sum(r["comparisons"] for r in rows) == 2 * 800


def length_world(n=1200, seed=0):
    """Two versions of equal quality; one writes longer answers, and the longer answer wins."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        long_len, short_len = int(rng.integers(100, 300)), int(rng.integers(20, 220))
        delta = (long_len - short_len) / (long_len + short_len)
        long_won = rng.random() < 1 / (1 + np.exp(-6.0 * delta))
        if rng.random() < 0.5:
            out.append(
                Comparison("policy-long", "policy-short", float(long_won), long_len, short_len)
            )
        else:
            out.append(
                Comparison("policy-short", "policy-long", float(not long_won), short_len, long_len)
            )
    return out


def ratings(board):
    return {row["policy"]: row for row in board["rows"]}


def test_a_pure_length_effect_is_not_mistaken_for_quality():
    world = length_world()
    naive = ratings(leaderboard(world, style_control=False))
    assert naive["policy-long"]["ci_low"] > naive["policy-short"]["ci_high"]  # fooled by length

    controlled_board = leaderboard(world, style_control=True)
    controlled = ratings(controlled_board)
    long, short = controlled["policy-long"], controlled["policy-short"]
    assert long["ci_low"] < short["rating"] < long["ci_high"]  # the versions tie
    assert abs(long["rating"] - short["rating"]) < 0.25 * abs(
        naive["policy-long"]["rating"] - naive["policy-short"]["rating"]
    )
    assert controlled_board["length_ci"][0] > 0  # the length effect is found and named


def test_ties_count_half_a_win_each_way():
    board = leaderboard([Comparison("policy-0001", "policy-base", 0.5, 10, 10)] * 6)
    rows = ratings(board)
    assert rows["policy-0001"]["wins"] == rows["policy-base"]["wins"] == 3.0
    assert rows["policy-0001"]["rating"] == pytest.approx(rows["policy-base"]["rating"])


def test_a_version_that_always_wins_keeps_a_finite_rating():
    board = leaderboard([Comparison("policy-0001", "policy-base", 1.0, 10, 30)] * 20)
    assert all(np.isfinite([r["rating"], r["ci_low"], r["ci_high"]]).all() for r in board["rows"])
    assert board["rows"][0]["policy"] == "policy-0001"


def test_no_comparisons_no_rows():
    assert leaderboard([])["rows"] == []
