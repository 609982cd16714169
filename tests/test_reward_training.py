"""Bradley–Terry head training on synthetic embeddings with a known preference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.reward_training import (
    EmbeddingCache,
    Evaluation,
    Pair,
    RewardTrainingConfig,
    evaluate,
    expected_calibration_error,
    is_heldout,
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


def test_bootstrap_makes_heads_disagree_more_on_unseen_than_seen_pairs():
    emb, chosen, rejected, _ = synthetic(n_pairs=60)
    heads = Heads()
    train_heads(
        heads, heads, emb, chosen, rejected, torch.ones(60), K, RewardTrainingConfig(epochs=30)
    )
    p = preference_probabilities(heads, emb, chosen, rejected)
    assert p.std(axis=1).mean() > 0.0  # heads differ: there is an epistemic signal at all


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


def test_promotion_gate_rejects_a_worse_model_with_the_reason():
    serving = Evaluation(100, 0.80, 0.05, 0.1, {})
    ok, _ = should_promote(Evaluation(100, 0.79, 0.05, 0.1, {}), serving, 0.02)
    worse, reason = should_promote(Evaluation(100, 0.70, 0.05, 0.1, {}), serving, 0.02)
    assert ok and not worse
    assert "0.700" in reason and "0.800" in reason
