"""Policy training (DPO and ILF through TRL), its promotion gate, and the job that runs them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_job import seed_annotations

from rlhf_core.config import BackendConfig
from rlhf_core.policy import Policy, PolicyConfig
from rlhf_core.registry import POLICY, REJECTED, REWARD_MODEL
from rlhf_core.store import Store
from rlhf_core.tiny import ensure_tiny_encoder
from trainer.jobs import policy_records, registry_for, train_job, train_policy_version
from trainer.policy_training import (
    GUIDED_TEMPLATE,
    FeedbackExample,
    PolicyTrainingConfig,
    UnpairedExample,
    grpo_gate,
    ilf_refinements,
    penalized_reward,
    policy_gate,
    train_policy,
)
from trainer.reward_training import Pair

CHOSEN, REJECTED_TEXT = " thank you kindly", " go away now"
FAST = dict(epochs=2, batch_size=4, learning_rate=1e-3, max_length=64, gate_prompts=4)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only spin on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("policy-cache")


@pytest.fixture
def policy(cache_dir):
    return Policy.load(PolicyConfig(max_new_tokens=6, batch_size=4), cache_dir)


def log_prob(policy: Policy, prompt: str, response: str) -> float:
    """log p(response | prompt) under the policy (teacher forcing)."""
    tok = policy.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + tok(response)["input_ids"]])
    with torch.no_grad():
        logits = policy.model(ids).logits[0, :-1]  # (T-1, V)
    logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method"):
        PolicyTrainingConfig(method="ppo")
    with pytest.raises(ValueError, match="lora"):
        PolicyTrainingConfig(lora="maybe")
    with pytest.raises(ValueError, match="min_win_rate"):
        PolicyTrainingConfig(min_win_rate=1.0)
    with pytest.raises(ValueError, match="whole groups"):
        PolicyTrainingConfig(method="grpo", batch_size=6, grpo_generations=4)
    PolicyTrainingConfig(method="dpo", batch_size=6)  # GRPO's group size does not bind DPO


def test_dpo_moves_the_policy_towards_chosen_responses_and_leaves_the_original(policy):
    pairs = [Pair(f"Question {i}:", CHOSEN, REJECTED_TEXT) for i in range(8)]

    def margin(p: Policy) -> float:
        return log_prob(p, "Question 99:", CHOSEN) - log_prob(p, "Question 99:", REJECTED_TEXT)

    before = margin(policy)
    original = {k: v.clone() for k, v in policy.model.state_dict().items()}
    steps: list[tuple[int, int, float]] = []
    trained, stats = train_policy(
        policy, pairs, [], PolicyTrainingConfig(**FAST), on_step=lambda *s: steps.append(s)
    )
    assert stats["dpo_pairs"] == 8 and stats["dpo"]["steps"] == 4
    assert stats["dpo"]["last_loss"] < stats["dpo"]["first_loss"]
    assert margin(trained) > before + 1.0  # a prompt it never saw: the preference generalised
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in original.items())
    assert steps and steps[-1][:2] == (4, 4)


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_chat_policy_is_trained_in_the_template_it_answers_in(policy, monkeypatch):
    import datasets

    policy.tokenizer.chat_template = CHAT_TEMPLATE
    assert policy.chats
    seen: list[list[dict]] = []
    from_list = datasets.Dataset.from_list
    monkeypatch.setattr(
        datasets.Dataset, "from_list", lambda rows: seen.append(rows) or from_list(rows)
    )
    pairs = [Pair(f"Question {i}:", CHOSEN, REJECTED_TEXT) for i in range(8)]

    def margin(p: Policy) -> float:  # the prompt as generate() sends it
        prompt = p.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Question 99:"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return log_prob(p, prompt, CHOSEN) - log_prob(p, prompt, REJECTED_TEXT)

    before = margin(policy)
    trained, stats = train_policy(policy, pairs, [], PolicyTrainingConfig(**FAST))
    assert seen[-1][0]["prompt"] == [{"role": "user", "content": "Question 0:"}]
    assert seen[-1][0]["chosen"] == [{"role": "assistant", "content": CHOSEN}]
    assert margin(trained) > before + 1.0, stats


def test_lora_training_is_merged_into_a_plain_causal_lm(policy, tmp_path):
    pairs = [Pair(f"Question {i}:", CHOSEN, REJECTED_TEXT) for i in range(4)]
    trained, stats = train_policy(policy, pairs, [], PolicyTrainingConfig(lora="on", **FAST))
    assert stats["dpo"]["lora"] is True
    assert type(trained.model) is type(policy.model)  # merged: no PEFT wrapper left
    changed = [
        k
        for k, v in trained.model.state_dict().items()
        if not torch.equal(v, policy.model.state_dict()[k])
    ]
    assert changed


def test_ilf_keeps_the_refinement_most_similar_to_the_feedback(policy):
    feedback = [
        FeedbackExample("Say hello.", "bye", "be friendlier"),
        FeedbackExample("Add.", "3", "show work"),
    ]
    seen: list[list[str]] = []

    def similarity(texts, feedbacks):
        seen.append(texts)
        return np.array([len(t) for t in texts], dtype=float)  # "most similar": the longest

    examples = ilf_refinements(policy, feedback, 3, similarity)
    assert [e["prompt"] for e in examples] == ["Say hello.", "Add."]
    for example, candidates in zip(examples, seen, strict=True):
        assert len(candidates) <= 3
        assert example["completion"] == max(candidates, key=len)


def test_ilf_fine_tunes_on_the_kept_refinements(policy):
    feedback = [FeedbackExample(f"Task {i}.", "meh", "more detail") for i in range(4)]
    similarity = lambda texts, feedbacks: np.arange(len(texts), dtype=float)  # noqa: E731
    trained, stats = train_policy(policy, [], feedback, PolicyTrainingConfig(**FAST), similarity)
    assert stats["ilf_examples"] == 4 and stats["ilf"]["steps"] >= 1
    assert any(
        not torch.equal(v, policy.model.state_dict()[k])
        for k, v in trained.model.state_dict().items()
    )


def test_kto_moves_the_policy_towards_desirable_answers_and_away_from_undesirable_ones(policy):
    """Unpaired verdicts (thumbs up on one answer, down on another, never side by side)."""
    unpaired = [
        UnpairedExample(f"Question {i}:", CHOSEN if i % 2 else REJECTED_TEXT, bool(i % 2))
        for i in range(8)
    ]

    def margin(p: Policy) -> float:
        return log_prob(p, "Question 99:", CHOSEN) - log_prob(p, "Question 99:", REJECTED_TEXT)

    before = margin(policy)
    original = {k: v.clone() for k, v in policy.model.state_dict().items()}
    trained, stats = train_policy(policy, [], [], PolicyTrainingConfig(**FAST), unpaired=unpaired)
    assert stats["kto_examples"] == 8 and stats["kto"]["steps"] >= 1 and stats["dpo_pairs"] == 0
    assert any(not torch.equal(v, original[k]) for k, v in trained.model.state_dict().items())
    assert margin(trained) > before + 1.0, (before, margin(trained), stats)


def test_feedback_without_a_draft_is_guidance_for_a_new_answer(policy, monkeypatch):
    asked: list[str] = []
    generate = policy.generate
    monkeypatch.setattr(
        policy, "generate", lambda prompts, n, **kw: asked.extend(prompts) or generate(prompts, n)
    )
    feedback = [
        FeedbackExample("Name a prime.", "", "say why it is prime"),
        FeedbackExample("Add 2 and 2.", "5", "check the sum"),
    ]
    examples = ilf_refinements(policy, feedback, 2, lambda t, f: np.zeros(len(t)))

    assert asked[0] == GUIDED_TEMPLATE.format(
        prompt="Name a prime.", feedback="say why it is prime"
    )
    assert "A draft answer:\n5" in asked[1]
    assert [e["prompt"] for e in examples] == ["Name a prime.", "Add 2 and 2."]


def test_gate_promotes_only_a_policy_the_reward_model_prefers(policy):
    pairs = [Pair(f"Question {i}:", CHOSEN, REJECTED_TEXT) for i in range(8)]
    trained, _ = train_policy(policy, pairs, [], PolicyTrainingConfig(**FAST))
    config = PolicyTrainingConfig(**FAST)
    prompts = [f"Question {i}:" for i in range(4)]

    def judge_by(word):
        # A judge that rewards a word: per item (2 responses, 2 heads).
        return lambda items: [
            np.array([[r.count(word)] * 2 for r in responses], dtype=float)
            for _, responses in items
        ]

    indifferent = policy_gate(
        lambda items: [np.zeros((2, 2)) for _ in items], trained, policy, prompts, config
    )
    assert indifferent.win_rate == 0.5 and not indifferent.promote
    assert "not above" in indifferent.reason
    same = policy_gate(judge_by("thank"), policy, policy, prompts, config)
    assert same.win_rate == 0.5 and not same.promote  # same seed, same answers: no win
    k = config.gate_samples
    ours = [a for t in trained.generate(prompts, k, seed=config.seed) for a in t]
    theirs = [b for t in policy.generate(prompts, k, seed=config.seed) for b in t]
    word = next(w for a in ours for w in a.split() if all(w not in b for b in theirs))
    better = policy_gate(judge_by(word), trained, policy, prompts, config)
    assert better.win_rate > 0.5 and better.promote
    assert better.evidence["n"] == len(prompts) * k and better.evidence["ci_low"] >= 0.5


def test_grpo_reward_is_the_heads_mean_less_the_penalty_times_their_spread():
    def judge(items):  # "a": heads split 1 / 3; anything else: heads agree on 2
        return [np.array([[1.0, 3.0] if r[0] == "a" else [2.0, 2.0]]) for _, r in items]

    assert penalized_reward(judge, 1.0)(["p", "p"], ["a", "b"]) == pytest.approx([1.0, 2.0])
    assert penalized_reward(judge, 0.0)(["p", "p"], ["a", "b"]) == pytest.approx([2.0, 2.0])


def judge_e(items):  # likes the letter "e" (the tiny model's samples vary in it); heads agree
    return [np.array([[r.count("e")] * 2 for r in responses], float) for _, responses in items]


@pytest.mark.parametrize("chats", [False, True])
def test_grpo_raises_what_the_reward_model_gives_the_policys_own_answers(policy, chats):
    policy.tokenizer.chat_template = CHAT_TEMPLATE if chats else None
    judged: list[str] = []

    def judge(items):
        judged.extend(prompt for prompt, _ in items)
        return judge_e(items)

    prompts = [f"Question {i}:" for i in range(8)]
    pairs = [Pair(p, CHOSEN, REJECTED_TEXT) for p in prompts]
    config = PolicyTrainingConfig(method="grpo", max_new_tokens=6, **FAST)
    with pytest.raises(ValueError, match="judge"):
        train_policy(policy, pairs, [], config)
    trained, stats = train_policy(policy, pairs, [], config, judge=judge)

    def mean_reward(p: Policy) -> float:
        answers = [t for texts in p.generate(prompts, 4, seed=1) for t in texts]
        return float(np.mean([a.count("e") for a in answers]))

    assert stats["grpo_prompts"] == 8 and stats["dpo_pairs"] == 0
    assert stats["grpo"]["steps"] > 0 and "last_reward" in stats["grpo"]
    assert mean_reward(trained) > mean_reward(policy) + 0.5, stats
    assert set(judged) <= set(prompts)  # the judge sees the plain prompt, template or not


@pytest.fixture
def config(tmp_path, tmp_path_factory):
    backbone = str(ensure_tiny_encoder(tmp_path_factory.mktemp("models")))
    return BackendConfig(data_dir=tmp_path, reward_backbone=backbone, reward_heads=4)


def test_train_job_records_a_policy_version_with_its_gate(config):
    assert config.policy_training == "dpo"  # the default
    store = Store(config.db_path).initialize()
    seed_annotations(store, 40)
    store.enqueue_training(1, "test")
    result = train_job(config, store.claim_job("test"))
    policy = result["policy"]
    registry = registry_for(config)
    version = registry.get(1, POLICY, policy["version"])
    gate = version.metrics["gate"]
    assert "win rate" in version.reason and gate["n"] == gate["prompts"] * gate["samples"]
    assert gate["samples"] == PolicyTrainingConfig().gate_samples and gate["prompts"] > 0
    assert gate["ci_low"] <= gate["win_rate"] <= gate["ci_high"]
    assert version.metrics["dpo_pairs"] > 0
    assert version.metrics["judge"] == registry.served(1, REWARD_MODEL).version == "rm-0001"
    assert (version.path / "config.json").is_file()
    Policy.load(PolicyConfig(model=str(version.path)), config.data_dir / "cache")  # loads back


def test_a_policy_that_did_not_change_is_rejected_and_not_served(config):
    """With a zero learning rate the candidate answers exactly as the serving policy does: the
    win rate is 0.5 on every prompt, so the gate must reject it."""
    store = Store(config.db_path).initialize()
    seed_annotations(store, 24)
    records = store.records(1, "preference")
    registry = registry_for(config)
    training = PolicyTrainingConfig(**{**FAST, "learning_rate": 0.0})
    result = train_policy_version(config, registry, 1, records, [], training=training)
    version = registry.get(1, POLICY, result["version"])
    assert not result["passed"] and version.status == REJECTED
    assert version.metrics["gate"]["win_rate"] == 0.5 and "not above" in version.reason
    assert registry.served(1, POLICY).version == "policy-base"


def test_ilf_inside_a_training_job_keeps_what_the_reward_backbone_finds_most_similar(
    config, monkeypatch
):
    """The job's ILF similarity is the production one: cosine similarity of the reward model's
    backbone embeddings of each refinement and its feedback."""
    import trainer.policy_training as policy_training
    from rlhf_core.reward_model import RewardModel

    store = Store(config.db_path).initialize()
    seed_annotations(store, 24)
    feedback = (
        "feedback",
        {
            "project": 1,
            "task": 1,
            "annotation": 1,
            "annotator": 7,
            "prompt": "question 1",
            "response": "go away 1, no",
            "feedback": "be polite and say thank you",
            "control": "fb",
        },
    )
    stored = store.annotations(1)[0]
    from test_training_job import CONFIG

    from rlhf_core.store import IncomingAnnotation

    incoming = IncomingAnnotation(1, 1, 1, 7, stored.task_data, stored.result, False, "t2", CONFIG)
    store.upsert_annotation(incoming, [("preference", store.records(1)[0]), feedback])
    calls = []
    real = policy_training.ilf_refinements

    def spy(policy, examples, n, similarity):
        def recorded(texts, feedbacks):
            scores = similarity(texts, feedbacks)
            calls.append((list(texts), list(feedbacks), np.asarray(scores)))
            return scores

        kept = real(policy, examples, n, recorded)
        calls.append(kept)
        return kept

    monkeypatch.setattr(policy_training, "ilf_refinements", spy)
    store.enqueue_training(1, "test")
    result = train_job(config, store.claim_job("test"))
    (texts, feedbacks, scores), kept = calls
    judge = RewardModel.load(registry_for(config).get(1, REWARD_MODEL, "rm-0001").path)
    a = judge.embed([""] * len(texts), texts)
    b = judge.embed([""] * len(feedbacks), feedbacks)
    expected = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert kept[0]["completion"] == texts[int(np.argmax(expected))]
    assert result["policy"]["metrics"]["ilf_examples"] == 1


def test_a_crash_in_policy_training_leaves_the_served_policy(config, monkeypatch):
    import trainer.jobs as jobs

    store = Store(config.db_path).initialize()
    seed_annotations(store, 20)
    store.enqueue_training(1, "test")

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(jobs, "train_policy", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_job(config, store.claim_job("test"))
    registry = registry_for(config)
    assert registry.served(1, POLICY).version == "policy-base"
    assert registry.versions(1, POLICY) == []


def test_train_job_with_grpo_trains_against_the_served_reward_model(config):
    config = dataclasses.replace(config, policy_training="grpo", max_new_tokens=8)
    store = Store(config.db_path).initialize()
    seed_annotations(store, 24)
    store.enqueue_training(1, "test")
    result = train_job(config, store.claim_job("test"))
    registry = registry_for(config)
    version = registry.get(1, POLICY, result["policy"]["version"])
    assert version.metrics["grpo_prompts"] > 0 and version.metrics["dpo_pairs"] == 0
    assert version.metrics["grpo"]["steps"] > 0
    assert version.metrics["judge"] == "rm-0001"  # what the job serves, not what it replaced
    gate = version.metrics["gate"]
    assert (
        gate["rule"] == "held-out human pairs (GRPO)" and "held-out human pairs" in version.reason
    )
    assert "disagreement_candidate" in gate or gate["n"] == 0


def test_grpo_gate_judges_on_held_out_human_pairs(policy):
    config = PolicyTrainingConfig(**FAST)
    heldout = [Pair(f"Question {i}:", CHOSEN, REJECTED_TEXT, group=f"1:{i}") for i in range(12)]
    calm = lambda items: [np.ones((len(r), 2)) for _, r in items]  # noqa: E731 - heads agree
    same = grpo_gate(calm, policy, policy, heldout, config)
    assert same.promote and same.evidence["rule"] == "held-out human pairs (GRPO)"
    assert same.evidence["n"] == 12 and same.evidence["ci_low"] == same.evidence["ci_high"] == 0
    assert not same.evidence["over_optimisation_alarm"]
    assert grpo_gate(calm, policy, policy, [], config).promote is False  # nothing to judge on


THUMBS = Path(__file__).resolve().parents[1] / "label_configs" / "thumbs.xml"
RANKING = Path(__file__).resolve().parents[1] / "label_configs" / "ranking.xml"


def store_annotations(store: Store, xml: str, annotations: list[tuple[dict, list]]) -> None:
    """Annotations of project 1 converted as the webhook would (task i+1, annotator 7)."""
    from rlhf_core.conversion import Provenance, convert
    from rlhf_core.label_schema import parse_label_config
    from rlhf_core.store import IncomingAnnotation

    store.upsert_project(1, xml)
    schema = parse_label_config(xml)
    for i, (data, result) in enumerate(annotations):
        incoming = IncomingAnnotation(i + 1, 1, i + 1, 7, data, result, False, "t", xml)
        store.upsert_annotation(
            incoming, convert(result, data, schema, Provenance(1, i + 1, i + 1, 7))
        )


def thumbs_annotation(i: int) -> tuple[dict, list]:
    good = i % 2 == 0
    data = {"prompt": f"question {i}", "response": f"{'thank you' if good else 'go away'} {i}"}
    verdict = "Thumbs up: good response" if good else "Thumbs down: bad response"
    result = [
        {
            "from_name": "verdict",
            "to_name": "response",
            "type": "choices",
            "value": {"choices": [verdict]},
        },
    ]
    if i % 4 == 1:
        result.append(
            {
                "from_name": "feedback",
                "to_name": "response",
                "type": "textarea",
                "value": {"text": ["be polite and say thank you"]},
            }
        )
    return data, result


def test_a_project_with_only_thumbs_and_feedback_trains_its_policy_with_kto_and_ilf(config):
    """No preference pair at all: no reward model, but the policy still learns (and, with no
    trained reward model to judge it, is recorded, not promoted)."""
    store = Store(config.db_path).initialize()
    store_annotations(store, THUMBS.read_text(), [thumbs_annotation(i) for i in range(8)])
    store.enqueue_training(1, "test")
    result = train_job(config, store.claim_job("test"))

    assert result["trained"] is False and "reward model needs 2" in result["reason"]
    policy = result["policy"]
    metrics = policy["metrics"]
    assert metrics["kto_examples"] == 8 and metrics["kto"]["steps"] >= 1
    assert metrics["ilf_examples"] == 2
    registry = registry_for(config)
    version = registry.get(1, POLICY, policy["version"])
    assert not policy["promoted"] and "no trained reward model" in version.reason
    assert registry.served(1, POLICY).version == "policy-base"


def ranking_annotation(i: int, notes: bool, ranked: bool) -> tuple[dict, list]:
    candidates = [
        {"id": "c1", "title": "Candidate 1", "body": f"thank you, the answer is {i}"},
        {"id": "c2", "title": "Candidate 2", "body": f"go away {i}"},
    ]
    data = {"prompt": f"question {i}", "candidates": candidates}
    tiers = {"_": [], "best": ["c1"], "good": [], "weak": [], "unacceptable": ["c2"]}
    result = []
    if ranked:
        result.append(
            {
                "from_name": "rank",
                "to_name": "candidates",
                "type": "ranker",
                "value": {"ranker": tiers},
            }
        )
    if notes:
        result.append(
            {
                "from_name": "notes",
                "to_name": "prompt",
                "type": "textarea",
                "value": {"text": ["mention the number twice"]},
            }
        )
    return data, result


def test_prompt_level_notes_refine_the_response_the_annotation_ranked_best(config):
    store = Store(config.db_path).initialize()
    annotations = [ranking_annotation(i, notes=i < 2, ranked=i != 1) for i in range(6)]
    store_annotations(store, RANKING.read_text(), annotations)

    feedback = sorted(
        (r for r in policy_records(store, 1) if "feedback" in r), key=lambda r: r["annotation"]
    )
    assert [(r["prompt"], r["response"]) for r in feedback] == [
        ("question 0", "thank you, the answer is 0"),  # its own annotation's best tier
        ("question 1", ""),  # nothing ranked: guidance for a new answer
    ]
    records = store.records(1, "ranking")
    from rlhf_core.conversion import preference_pairs

    pairs = preference_pairs(store.records(1, "preference"), records)
    training = PolicyTrainingConfig(**FAST)
    result = train_policy_version(
        config, registry_for(config), 1, pairs, policy_records(store, 1), training=training
    )
    assert result["metrics"]["ilf_examples"] == 2 and result["metrics"]["ilf"]["steps"] >= 1
