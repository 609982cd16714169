"""The reward-model ensemble on a tiny BERT built from a config, plus one real MiniLM check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf_core.reward_model import (
    DEFAULT_BACKBONE,
    CheckpointError,
    RewardModel,
    RewardModelConfig,
    Scores,
)
from rlhf_core.tiny import build_tiny_encoder

ITEMS = [
    (
        "Explain why the sky is blue in simple terms.",
        [
            "Sunlight scatters off the molecules of the air, and blue light scatters the most.",
            "Because it reflects the ocean.",
        ],
    ),
    (
        "Write a short poem about autumn leaves.",
        [
            "Crimson leaves falling in the cold wind.",
            "No.",
            "Autumn comes after summer, 391 times.",
        ],
    ),
    ("How do I reverse a list in Python?", ["Use reversed(items) or items[::-1].", "You cannot."]),
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy CI machine OpenMP threads
    # spin against other processes: one thread makes these tests ~10x faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return str(build_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert", seed=0))


@pytest.fixture(scope="module")
def model(backbone):
    return RewardModel.create(RewardModelConfig(backbone=backbone, batch_size=4))


def off_diagonal(matrix: list[list[float]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]


def test_config_rejects_bad_values_and_resolves_the_default_backbone():
    assert RewardModelConfig().backbone == DEFAULT_BACKBONE
    with pytest.raises(ValueError, match="at least 2 heads"):
        RewardModelConfig(num_heads=1)
    with pytest.raises(ValueError, match="pooling"):
        RewardModelConfig(pooling="cls")
    with pytest.raises(ValueError, match="unknown reward-model config keys"):
        RewardModelConfig.from_dict({"num_heads": 4, "heads": 4})


def test_shapes(model):
    prompts, responses = ["a question", "another one", "x"], ["an answer", "", "y z"]
    emb = model.embed(prompts, responses)
    assert emb.shape == (3, model.hidden_size) and emb.dtype == torch.float32
    assert model.head_rewards(emb).shape == (3, model.num_heads)
    scores = model.score(ITEMS)
    assert len(scores) == len(ITEMS)
    for (_, responses), s in zip(ITEMS, scores, strict=True):
        n = len(responses)
        assert len(s.rewards) == len(s.reward_std) == n
        assert np.shape(s.prob) == np.shape(s.prob_std) == (n, n)
        assert np.shape(s.head_rewards) == (n, model.num_heads)
    assert model.score([]) == []
    assert model.score([("a prompt with no responses", [])])[0].rewards == []


def test_untrained_model_says_so_and_its_heads_disagree(model):
    assert model.trained is False and model.version is None
    scores = model.score(ITEMS)
    assert all(s.trained is False for s in scores)
    prob_std = [v for s in scores for v in off_diagonal(s.prob_std)]
    assert np.mean(prob_std) > 0.1, prob_std  # the prior's disagreement: "I do not know"
    pair = scores[0].pair(0, 1)
    assert pair.epistemic_std > 0.05 and pair.mutual_information > 0.01
    assert 0.0 <= pair.mutual_information <= pair.entropy <= 1.0


def test_preference_probabilities_are_complementary(model):
    for s in model.score(ITEMS):
        p = np.array(s.prob)
        np.testing.assert_allclose(p + p.T, 1.0, atol=1e-9)
        np.testing.assert_allclose(np.diag(p), 0.5)
        np.testing.assert_allclose(np.array(s.prob_std), np.array(s.prob_std).T, atol=1e-9)
        assert s.pair(0, 1).prob == pytest.approx(1.0 - s.pair(1, 0).prob)


def test_batched_score_equals_per_item_score(model):
    together = model.score(ITEMS)  # batch_size 4 < 7 pairs: items straddle batches
    for item, batched in zip(ITEMS, together, strict=True):
        (alone,) = model.score([item])
        np.testing.assert_allclose(batched.head_rewards, alone.head_rewards, atol=1e-5)
        np.testing.assert_allclose(batched.prob, alone.prob, atol=1e-5)


def test_heads_share_one_backbone_pass_per_batch(backbone):
    calls = []
    for num_heads in (2, 16):
        rm = RewardModel.create(
            RewardModelConfig(backbone=backbone, num_heads=num_heads, batch_size=4)
        )
        hook = rm.backbone.register_forward_hook(lambda *_, k=num_heads: calls.append(k))
        rm.score(ITEMS)  # 7 (prompt, response) pairs -> ceil(7 / 4) = 2 backbone passes
        hook.remove()
    assert calls == [2, 2, 16, 16]


def test_head_rewards_train_on_cached_embeddings(model):
    rm = RewardModel.create(model.config)
    emb = rm.embed(
        [p for p, _ in ITEMS] * 2, [rs[0] for _, rs in ITEMS] + [rs[1] for _, rs in ITEMS]
    )
    chosen, rejected = emb[:3], emb[3:]  # a frozen-backbone loop: embed once, train heads
    before = {k: v.clone() for k, v in rm.heads.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = -torch.nn.functional.logsigmoid(rm.pair_logits(chosen, rejected)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = rm.heads.state_dict()
    assert not torch.equal(before["w2"], after["w2"])  # trainable heads moved
    assert torch.equal(before["prior_w2"], after["prior_w2"])  # priors are frozen
    assert all(p.grad is None for p in rm.backbone.parameters())  # backbone frozen by default


def test_forward_matches_embed_and_reaches_the_backbone_when_unfrozen(backbone):
    rm = RewardModel.create(RewardModelConfig(backbone=backbone))
    rm.backbone.requires_grad_(True)
    prompts, responses = ["a question", "x"], ["an answer", "a much longer answer than that"]
    rewards = rm(**rm.collate(prompts, responses))  # (B, K), with autograd
    with torch.no_grad():
        expected = rm.head_rewards(rm.embed(prompts, responses))
    torch.testing.assert_close(rewards.detach(), expected, atol=1e-5, rtol=1e-5)
    rewards.sum().backward()
    assert rm.backbone.get_input_embeddings().weight.grad is not None


def test_save_load_roundtrip_keeps_scores_config_and_provenance(model, tmp_path):
    provenance = {"version": "rm-0003", "trained": True, "metrics": {"accuracy": 0.7}, "data": "x"}
    model_copy = RewardModel.create(model.config)
    model_copy.save(tmp_path / "ckpt", provenance)
    assert model_copy.version == "rm-0003" and model_copy.trained

    loaded = RewardModel.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.version == "rm-0003" and loaded.trained is True
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["provenance"]["metrics"] == {"accuracy": 0.7}
    assert meta["provenance"]["data"] == "x"
    assert meta["provenance"]["base_backbone"] == model.config.backbone
    assert meta["provenance"]["backbone_in_checkpoint"] is False
    assert "created_at" in meta["provenance"]
    assert not (tmp_path / "ckpt" / "backbone").exists()  # frozen backbone: referenced, not copied
    for a, b in zip(model_copy.score(ITEMS), loaded.score(ITEMS), strict=True):
        assert a.head_rewards == b.head_rewards
        assert b.trained is True


def test_a_changed_backbone_travels_with_the_checkpoint(backbone, tmp_path):
    rm = RewardModel.create(RewardModelConfig(backbone=backbone))
    with torch.no_grad():
        rm.backbone.get_input_embeddings().weight.mul_(1.5)  # stands in for fine-tuning
    rm.save(tmp_path / "ckpt", include_backbone=True)
    assert rm.version and rm.version.startswith("rm-")  # content hash when no version is given
    loaded = RewardModel.load(tmp_path / "ckpt")
    assert loaded.version == rm.version
    np.testing.assert_allclose(
        loaded.score(ITEMS)[0].head_rewards, rm.score(ITEMS)[0].head_rewards, atol=1e-6
    )


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        RewardModel.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a reward-model checkpoint"):
        RewardModel.load(tmp_path)


def test_a_backbone_that_is_not_there_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="runs offline"):
        RewardModel.create(RewardModelConfig(backbone=str(tmp_path / "missing")))


def test_response_mean_pooling(backbone):
    rm = RewardModel.create(RewardModelConfig(backbone=backbone, pooling="response_mean"))
    scores = rm.score(ITEMS)
    assert all(np.isfinite(s.head_rewards).all() for s in scores)
    assert rm.embed(["prompt"], [""]).isfinite().all()  # empty response: falls back to all tokens


def test_scores_most_informative_pair():
    # Heads agree on (0, 1) and (0, 2) but split on (1, 2): that is the pair to ask about.
    s = Scores.from_head_rewards(np.array([[5.0, 5.0], [0.0, 3.0], [0.0, -3.0]]), trained=True)
    assert s.most_informative_pair() == (1, 2)
    assert Scores.from_head_rewards(np.zeros((1, 4)), trained=False).most_informative_pair() is None


def test_real_minilm_backbone_scores_a_pair_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rm = RewardModel.create(RewardModelConfig())
    assert rm.hidden_size == 384
    (s,) = rm.score([ITEMS[0]])
    assert s.trained is False
    assert 0.0 < s.prob[0][1] < 1.0
    assert s.prob[0][1] + s.prob[1][0] == pytest.approx(1.0)
    assert s.prob_std[0][1] > 0.05
