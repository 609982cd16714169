"""Bradley–Terry head training on synthetic embeddings with a known preference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.reward_training import (
    EmbeddingCache,
    Pair,
    RewardTrainingConfig,
    correct_choices,
    evaluate,
    expected_calibration_error,
    is_heldout,
    pair_margins,
    paired_bootstrap_interval,
    preference_probabilities,
    should_promote,
    split_pairs,
    train_heads,
)

K, H = 4, 16


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(H, K)

    def forward(self, x):
        return self.linear(x)


def synthetic(n_items=200, n_pairs=600, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    emb = torch.tensor(rng.normal(size=(n_items, H)), dtype=torch.float32)
    true_w = torch.tensor(rng.normal(size=H), dtype=torch.float32)
    reward = emb @ true_w
    a = torch.tensor(rng.integers(0, n_items, n_pairs))
    b = torch.tensor(rng.integers(0, n_items, n_pairs))
    a_wins = reward[a] > reward[b]
    flip = torch.tensor(rng.random(n_pairs) < noise)
    a_wins = a_wins ^ flip
    chosen = torch.where(a_wins, a, b)
    rejected = torch.where(a_wins, b, a)
    return emb, chosen, rejected, reward


def test_heads_learn_a_known_preference_and_parameters_change():
    emb, chosen, rejected, reward = synthetic(noise=0.1)
    heads = Heads()
    before = heads.linear.weight.detach().clone()
    train_heads(
        heads, heads, emb, chosen[:500], rejected[:500], torch.ones(500), K, RewardTrainingConfig()
    )
    assert not torch.equal(before, heads.linear.weight)
    p = preference_probabilities(heads, emb, chosen[500:], rejected[500:])
    truth = (reward[chosen[500:]] > reward[rejected[500:]]).numpy()
    accuracy = ((p.mean(axis=1) > 0.5) == truth).mean()
    assert accuracy > 0.85


def test_bootstrap_heads_disagree_more_on_unseen_than_on_seen_pairs():
    """Labelled items vary only in half of the embedding space; pairs of new items that also
    vary in the other half are where the ensemble should be unsure."""
    emb, chosen, rejected, _ = synthetic(n_items=200, n_pairs=400, seed=1)
    seen = torch.zeros(200, dtype=torch.bool)
    seen[torch.cat([chosen[:100], rejected[:100]])] = True
    emb = emb.clone()
    emb[seen, H // 2 :] = 0.0
    unseen = [i for i in range(100, 400) if not seen[chosen[i]] and not seen[rejected[i]]]
    assert len(unseen) > 30
    torch.manual_seed(0)
    heads = Heads()
    config = RewardTrainingConfig(epochs=30)
    train_heads(heads, heads, emb, chosen[:100], rejected[:100], torch.ones(100), K, config)
    on_seen = preference_probabilities(heads, emb, chosen[:100], rejected[:100]).std(axis=1)
    on_unseen = preference_probabilities(heads, emb, chosen[unseen], rejected[unseen]).std(axis=1)
    assert on_unseen.mean() > 1.2 * on_seen.mean(), (on_unseen.mean(), on_seen.mean())


def test_ties_train_towards_one_half():
    emb, chosen, rejected, _ = synthetic(n_pairs=100)
    heads = Heads()
    train_heads(
        heads,
        heads,
        emb,
        chosen,
        rejected,
        torch.full((100,), 0.5),
        K,
        RewardTrainingConfig(epochs=60, bootstrap=False, weight_decay=0.0),
    )
    p = preference_probabilities(heads, emb, chosen, rejected).mean(axis=1)
    assert np.abs(p - 0.5).mean() < 0.1


def margin_world(n=100, seed=0):
    """Pairs that differ in feature 0 (annotators: "significantly better") or in feature 1
    ("negligibly better"), the better side +1 in that feature, and one label in five the other
    way round in both groups (so the best fit is a finite gap): the same evidence either way."""
    rng = np.random.default_rng(seed)
    emb = torch.tensor(rng.normal(scale=0.1, size=(2 * n, H)), dtype=torch.float32)
    emb[:n:2, 0] += 1.0  # even rows of the first half: the better side, feature 0
    emb[n::2, 1] += 1.0  # even rows of the second half: the better side, feature 1
    better, worse = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
    flipped = torch.arange(n) % 5 == 0
    chosen, rejected = torch.where(flipped, worse, better), torch.where(flipped, better, worse)
    strong = torch.arange(n) < n // 2
    return emb, chosen, rejected, strong


def learned_gaps(margins):
    emb, chosen, rejected, strong = margin_world()
    torch.manual_seed(0)
    heads = Heads()
    config = RewardTrainingConfig(epochs=100, learning_rate=0.05, bootstrap=False, weight_decay=0.0)
    stats = train_heads(
        heads, heads, emb, chosen, rejected, torch.ones(len(chosen)), K, config, margins=margins
    )
    better = torch.where(torch.arange(len(chosen)) % 5 == 0, rejected, chosen)
    worse = torch.where(torch.arange(len(chosen)) % 5 == 0, chosen, rejected)
    with torch.no_grad():
        gap = (heads(emb[better]) - heads(emb[worse])).mean(axis=1)  # (N,)
    return float(gap[strong].mean()), float(gap[~strong].mean()), stats, heads


def test_a_graded_margin_asks_a_wider_reward_gap_of_strong_preferences():
    """Llama 2's -log sigmoid(r_c - r_r - m): with the same direction of evidence, the pairs
    labelled "significantly better" (m = 3) end with a wider reward gap than the "negligibly
    better" ones (m = 0); without margins both get the same gap."""
    _, strong = margin_world()[2:]
    margins = torch.where(strong, 3.0, 0.0)
    strong_gap, weak_gap, with_margin, heads_with = learned_gaps(margins)
    plain_strong, plain_weak, without, heads_without = learned_gaps(None)

    assert strong_gap > weak_gap + 1.0, (strong_gap, weak_gap)
    assert abs(plain_strong - plain_weak) < 0.2 * plain_weak, (plain_strong, plain_weak)
    assert weak_gap < 1.2 * plain_weak  # m = 0 asks nothing more of the weak pairs
    assert with_margin["final_loss"] > without["final_loss"]  # a harder target to meet
    assert not torch.allclose(heads_with.linear.weight, heads_without.linear.weight, atol=1e-2)


def test_pair_margins_come_from_graded_records_and_ties_have_none():
    base = {"prompt": "p", "chosen": "a", "rejected": "b", "project": 1, "task": 2}
    pairs = [
        Pair.from_record({**base, "strength": "significantly", "margin": 1.0}),
        Pair.from_record(base),
        Pair.from_record({**base, "tie": True, "margin": 1.0}),
    ]
    assert [p.margin for p in pairs] == [1.0, 0.0, 1.0]
    assert pair_margins(pairs).tolist() == [1.0, 0.0, 0.0]


def test_heldout_split_is_stable_and_keyed_by_task():
    pairs = [Pair("p", "a", "b", group=f"1:{task}") for task in range(1000)]
    _, heldout = split_pairs(pairs, 0.15)
    assert 100 < len(heldout) < 200
    more = pairs + [Pair("p", "c", "d", group=f"1:{task}") for task in range(1000, 1500)]
    _, heldout_later = split_pairs(more, 0.15)
    assert set(heldout) <= set(heldout_later)  # nothing moves between retrains
    assert is_heldout("1:7", 0.15) == is_heldout("1:7", 0.15)


def test_embedding_cache_embeds_each_distinct_text_once():
    calls = []

    def embed(prompts, responses):
        calls.append(len(prompts))
        return torch.ones(len(prompts), 3)

    cache = EmbeddingCache(embed)
    pairs = [Pair("p", "a", "b"), Pair("p", "b", "a"), Pair("q", "a", "b", tie=True)]
    cache.add(pairs)
    cache.add(pairs)
    assert calls == [4]
    chosen, rejected, target = cache.pair_indices(pairs)
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [1, 0, 3]
    assert target.tolist() == [1.0, 1.0, 0.5]


def test_correct_choices_are_per_decisive_pair_whether_the_heads_rank_it_right():
    def embed(prompts, responses):  # one dimension: +1 for the good answer, -1 for the bad
        return torch.tensor([[1.0] if r == "good" else [-1.0] for r in responses])

    cache = EmbeddingCache(embed)
    pairs = [Pair("p", "good", "bad"), Pair("p", "bad", "good"), Pair("p", "good", "bad", True)]
    cache.add(pairs)
    correct = correct_choices(lambda x: x.repeat(1, K), cache, pairs)  # reward = embedding
    assert correct.tolist() == [1.0, 0.0]  # the tie is not a choice


def test_correct_choices_of_no_pairs_are_an_empty_float_array_without_asking_the_cache():
    """The gate's case before any pair is labelled: the cache is empty (no rows to index)."""

    def nothing_to_embed(prompts, responses):
        raise AssertionError("no text to embed")

    def heads(x):
        raise AssertionError("no pair to score")

    correct = correct_choices(heads, EmbeddingCache(nothing_to_embed), [])
    assert correct.shape == (0,) and correct.dtype == np.float64


def test_evaluate_reports_accuracy_ece_and_annotator_agreement():
    pairs = [
        Pair("p", "a", "b", annotator=1),
        Pair("p", "a", "b", annotator=2),
        Pair("p", "a", "b", annotator=2),
        Pair("p", "a", "b", tie=True, annotator=1),
    ]
    p_heads = np.array([[0.9, 0.9], [0.2, 0.2], [0.8, 0.8], [0.5, 0.5]])
    result = evaluate(pairs, p_heads)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_annotator == {"1": 1.0, "2": 0.5}
    assert result.n_pairs == 4


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    assert expected_calibration_error(np.array([1.0, 1.0, 1.0])) == pytest.approx(0.0)
    overconfident = np.array([0.99] * 5 + [0.01] * 5)  # says "chosen" wins with 99%, half wrong
    assert expected_calibration_error(overconfident) > 0.4


def test_promotion_gate_rejects_a_worse_model_with_its_interval():
    rng = np.random.default_rng(0)
    serving = (rng.random(600) < 0.80).astype(float)
    worse = serving.copy()
    worse[np.flatnonzero(serving)[:48]] = 0.0  # 8 points of accuracy lost on 600 pairs
    decision = should_promote(worse, serving, tolerance=0.02, min_pairs=30)
    assert not decision.promote
    evidence = decision.evidence
    assert evidence["n"] == 600 and evidence["rule"] == "held-out non-inferiority"
    assert evidence["ci_low"] <= evidence["difference"] == pytest.approx(-0.08)
    assert evidence["ci_high"] < -0.02 and "lower end below -0.02" in decision.reason


def test_promotion_gate_passes_an_equal_model_and_a_slightly_worse_one_within_tolerance():
    rng = np.random.default_rng(1)
    serving = (rng.random(2000) < 0.8).astype(float)
    assert should_promote(serving.copy(), serving, 0.02, 30).promote
    slightly = serving.copy()
    slightly[np.flatnonzero(serving)[:6]] = 0.0  # -0.003
    assert should_promote(slightly, serving, 0.02, 30).promote


def test_below_the_held_out_minimum_the_stated_in_sample_rule_decides():
    """Six labelled pairs: the interval is wide and recorded, the point estimate decides."""
    serving = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    better = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # differences -1, 1, 1, 0, 1, 0
    passed = should_promote(better, serving, 0.02, 30, in_sample=True)
    assert passed.promote and passed.evidence["ci_low"] < 0 < passed.evidence["difference"]
    assert "in-sample" in passed.reason and "count from 30 on" in passed.reason
    held_out = should_promote(better, serving, 0.02, 30)  # the same pairs, had they counted
    assert not held_out.promote  # too few for the interval to exclude a loss
    worse = should_promote(np.ones(6) - np.eye(6)[0], np.ones(6), 0.02, 30, in_sample=True)
    assert not worse.promote and worse.evidence["difference"] == pytest.approx(-1 / 6)


def test_paired_bootstrap_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(2)
    small = rng.choice([-1.0, 0.0, 1.0], size=20)
    large = rng.choice([-1.0, 0.0, 1.0], size=2000)
    low_s, high_s = paired_bootstrap_interval(small)
    low_l, high_l = paired_bootstrap_interval(large)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert high_l - low_l < (high_s - low_s) / 5
