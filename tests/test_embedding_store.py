"""The per-machine embedding cache: re-scoring after a promotion reads vectors, not the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.reward_model import RewardModel, RewardModelConfig
from rlhf_core.tiny import build_tiny_encoder
from trainer.simulate import fresh_heads

ITEMS = [("a question", ["an answer", "another answer"]), ("q2", ["x", "y", "z"])]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    backbone = build_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert", seed=0)
    return RewardModel.create(RewardModelConfig(backbone=str(backbone), batch_size=4))


class CountingEncoder:
    """Counts the (prompt, response) pairs ``model.embed`` is asked to encode."""

    def __init__(self, model, monkeypatch):
        self.encoded: list[tuple[str, str]] = []
        real = model.embed

        def embed(prompts, responses):
            self.encoded += list(zip(prompts, responses))
            return real(prompts, responses)

        monkeypatch.setattr(model, "embed", embed)


def test_a_promotion_rescores_from_the_cache_without_the_encoder(model, tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path / "embeddings.sqlite")
    counter = CountingEncoder(model, monkeypatch)
    first, _ = model.score_and_embed(ITEMS, store)
    assert len(counter.encoded) == 5
    promoted = model  # a promotion swaps the heads only
    promoted.heads = fresh_heads(model, seed=7)
    with torch.no_grad():
        promoted.heads.w2.add_(0.5)
    rescored, _ = promoted.score_and_embed(ITEMS, store)
    assert len(counter.encoded) == 5  # nothing encoded again
    assert store.hits == 5 and store.misses == 5
    uncached, _ = promoted.score_and_embed(ITEMS)  # re-encoding: the same answer
    for a, b in zip(rescored, uncached):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(first[0], rescored[0])  # the new heads were used


def test_the_cache_survives_the_process_and_is_keyed_by_backbone(model, tmp_path, monkeypatch):
    path = tmp_path / "embeddings.sqlite"
    EmbeddingStore(path).embed(model, ["p"], ["r"])
    counter = CountingEncoder(model, monkeypatch)
    reopened = EmbeddingStore(path)
    reopened.embed(model, ["p"], ["r"])
    assert counter.encoded == []  # read from the file another process wrote
    monkeypatch.setattr(model.config, "max_length", 64)  # a different embedding: another key
    reopened.embed(model, ["p"], ["r"])
    assert counter.encoded == [("p", "r")]
    assert len(reopened) == 2


def test_forget_drops_every_vector_of_the_given_texts_and_nothing_else(model, tmp_path):
    store = EmbeddingStore(tmp_path / "embeddings.sqlite")
    store.embed(model, ["task prompt", "task prompt", "other"], ["reply a", "reply b", "reply c"])
    assert store.forget(["task prompt"]) == 2
    assert len(store) == 1
    assert store.forget(["reply c"]) == 1
    assert len(store) == 0
    assert store.forget(["never seen"]) == 0


def test_duplicate_pairs_in_one_call_are_encoded_once(model, tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path / "embeddings.sqlite")
    counter = CountingEncoder(model, monkeypatch)
    out = store.embed(model, ["p", "p", "q"], ["r", "r", "r"])
    assert sorted(counter.encoded) == [("p", "r"), ("q", "r")]
    torch.testing.assert_close(out[0], out[1])
