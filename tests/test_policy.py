"""Candidate generation with the tiny offline GPT-2, and the tiny-model builders themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_core.policy import Policy, PolicyConfig, PolicyLoadError
from rlhf_core.tiny import build_tiny_causal_lm, train_bert_tokenizer, train_byte_bpe_tokenizer

PROMPTS = [
    "Explain why the sky is blue in simple terms, for a child who is five years old.",
    "hi",
    "",  # an empty prompt still gets candidates
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
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("policy-cache")


@pytest.fixture(scope="module")
def policy(cache_dir):
    return Policy.load(PolicyConfig(max_new_tokens=6, batch_size=2), cache_dir)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        PolicyConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        PolicyConfig(top_p=1.5)
    with pytest.raises(ValueError, match="num_candidates"):
        PolicyConfig(num_candidates=0)


def test_generate_returns_n_continuations_per_prompt(policy):
    out = policy.generate(PROMPTS, n=3)
    assert len(out) == len(PROMPTS)
    assert all(len(cands) == 3 and all(isinstance(c, str) for c in cands) for cands in out)
    assert all(len(set(cands)) > 1 for cands in out)  # sampled, so candidates differ
    assert [len(c) for c in policy.generate(PROMPTS)] == [2, 2, 2]  # config.num_candidates
    assert policy.generate([]) == []


def test_generate_returns_only_the_continuation(policy):
    # The first prompt is ~20 tokens; 6 new tokens can never re-encode to that many.
    for candidate in policy.generate(PROMPTS[:1], n=4)[0]:
        assert len(policy.tokenizer(candidate)["input_ids"]) <= 2 * policy.config.max_new_tokens
        assert not candidate.startswith(PROMPTS[0][:10])


def test_left_padding_does_not_change_a_prompts_continuation(policy):
    short, long = (policy._prompt_ids(p) for p in PROMPTS[1::-1])
    batch = policy._left_pad([long, short])
    assert batch["input_ids"][1, 0] == policy._pad_id and batch["attention_mask"][1, 0] == 0

    def next_token_scores(rows):
        out = policy.model.generate(
            **policy._left_pad(rows),
            do_sample=False,
            max_new_tokens=1,
            pad_token_id=policy._pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        return out.scores[0]  # (B, V)

    alone, padded = next_token_scores([short])[0], next_token_scores([long, short])[1]
    torch.testing.assert_close(alone, padded, atol=1e-4, rtol=1e-4)


def test_generate_is_deterministic_given_a_seed(policy):
    first = policy.generate(PROMPTS, n=2)
    assert policy.generate(PROMPTS, n=2) == first
    assert policy.generate(PROMPTS, n=2, seed=1) != first
    state = torch.random.get_rng_state()
    policy.generate(PROMPTS[:1], n=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_default_model_is_built_once_and_loads_by_path(policy, cache_dir):
    assert policy.version.startswith("tiny-gpt2-seed0@")
    again = Policy.load(PolicyConfig(), cache_dir)
    assert again.version == policy.version
    (path,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    by_path = Policy.load(PolicyConfig(model=str(path)), cache_dir)
    assert by_path.version.endswith(policy.version.split("@")[1])


def test_tiny_builders_are_deterministic(tmp_path):
    assert train_bert_tokenizer().backend_tokenizer.to_str() == (
        train_bert_tokenizer().backend_tokenizer.to_str()
    )
    assert train_byte_bpe_tokenizer().backend_tokenizer.to_str() == (
        train_byte_bpe_tokenizer().backend_tokenizer.to_str()
    )
    state = torch.random.get_rng_state()
    a = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "c", seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_a_model_that_is_not_there_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PolicyLoadError, match="runs offline"):
        Policy.load(PolicyConfig(model=str(tmp_path / "missing")), tmp_path)
