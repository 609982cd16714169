"""Does policy training from noisy labels move the policy towards a known preference? On CPU.

The known preference: annotators like answers with many letters ``e`` (per character); each label
disagrees with that rule 20% of the time. The starting policy is the offline tiny GPT-2. It
writes two answers per training prompt, the noisy annotator picks one, and
``trainer.policy_training.train_policy`` (TRL's DPO, as the training job runs it) learns from
those labels. With ``--method grpo`` the labels train the reward model instead (the default
one: linear heads on all-MiniLM-L6-v2, as the training job does), and TRL's GRPO trains the
policy against it, rewarded with the heads' mean minus their spread. Then both policies answer
held-out prompts with the same sampling seeds and the rule judges each pair: the win rate counts
a tie as half.

    python bench/policy_training.py --labels 1000
    python bench/policy_training.py --labels 1000 --method grpo
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import OPENERS, TOPICS
from rlhf_core.policy import Policy, PolicyConfig
from trainer.policy_training import PolicyTrainingConfig, train_policy
from trainer.reward_training import (
    EmbeddingCache,
    Pair,
    RewardTrainingConfig,
    preference_probabilities,
    train_heads,
)


def quality(text: str) -> float:
    """The hidden rule: the share of characters that are the letter e."""
    return text.lower().count("e") / max(len(text), 1)


def prompts(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(OPENERS).format(t=rng.choice(list(TOPICS))) + f" ({i})" for i in range(n)]


def labelled_pairs(policy: Policy, n: int, noise: float, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    questions = prompts(n, rng)
    pairs = []
    for question, (a, b) in zip(questions, policy.generate(questions, 2, seed=seed), strict=True):
        truth_a = quality(a) > quality(b) or (quality(a) == quality(b) and rng.random() < 0.5)
        prefers_a = truth_a if rng.random() >= noise else not truth_a
        pairs.append(Pair(question, *((a, b) if prefers_a else (b, a))))
    return pairs


def reward_model_from(pairs: list[Pair], heldout: int) -> tuple[Any, float]:
    """The default reward model trained on ``pairs`` but the last ``heldout``, and its held-out
    accuracy against the hidden rule (pairs the rule calls a tie left out)."""
    from rlhf_core.config import BackendConfig
    from rlhf_core.reward_model import RewardModel
    from rlhf_core.serving import reward_model_config

    model = RewardModel.create(reward_model_config(BackendConfig()))
    cache = EmbeddingCache(model.embed)
    cache.add(pairs)
    matrix = cache.matrix()
    train, test = pairs[:-heldout], pairs[-heldout:]
    chosen, rejected, target = cache.pair_indices(train)
    config = RewardTrainingConfig()
    train_heads(
        model.heads,
        model.head_rewards,
        matrix,
        chosen,
        rejected,
        target,
        model.config.num_heads,
        config,
    )
    test = [p for p in test if quality(p.chosen) != quality(p.rejected)]
    chosen, rejected, _ = cache.pair_indices(test)
    p_chosen = preference_probabilities(model.head_rewards, matrix, chosen, rejected).mean(-1)
    right = [(p > 0.5) == (quality(x.chosen) > quality(x.rejected)) for p, x in zip(p_chosen, test)]
    return model, sum(right) / max(len(right), 1)


def win_rate(new: Policy, old: Policy, questions: list[str], seeds: int) -> float:
    wins = 0.0
    for seed in range(seeds):
        ours = new.generate(questions, 1, seed=1000 + seed)
        theirs = old.generate(questions, 1, seed=1000 + seed)
        for [a], [b] in zip(ours, theirs, strict=True):
            wins += 1.0 if quality(a) > quality(b) else 0.5 if quality(a) == quality(b) else 0.0
    return wins / (len(questions) * seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=["dpo", "grpo"], default="dpo")
    parser.add_argument("--grpo-prompts", type=int, default=400, help="prompts GRPO trains on")
    parser.add_argument("--uncertainty-penalty", type=float, default=1.0, help="GRPO's lambda")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"method": args.method}
    with tempfile.TemporaryDirectory() as cache:
        base = Policy.load(PolicyConfig(max_new_tokens=24, batch_size=32), cache)
        pairs = labelled_pairs(base, args.labels, args.noise, args.seed)
        judge = None
        if args.method == "grpo":
            reward_model, accuracy = reward_model_from(pairs, heldout=len(pairs) // 5)
            report["reward_model_accuracy_vs_rule"] = round(accuracy, 3)
            judge = reward_model.score_heads
            pairs = pairs[: args.grpo_prompts]  # GRPO trains on their prompts only
        training = PolicyTrainingConfig(
            method=args.method,
            learning_rate=5e-4,
            epochs=2,
            max_length=96,
            max_new_tokens=24,
            uncertainty_penalty=args.uncertainty_penalty,
        )
        started = time.perf_counter()
        trained, stats = train_policy(base, pairs, [], training, judge=judge)
        seconds = time.perf_counter() - started
        held_out = prompts(args.eval_prompts, random.Random(args.seed + 1))
        report |= {
            "labels": args.labels,
            "noise": args.noise,
            "uncertainty_penalty": args.uncertainty_penalty if judge else None,
            "train_seconds": round(seconds, 1),
            args.method: stats[args.method],
            "win_rate_vs_start": round(win_rate(trained, base, held_out, seeds=3), 3),
            "start_quality": round(
                sum(quality(t[0]) for t in base.generate(held_out, 1, seed=7)) / len(held_out), 4
            ),
            "trained_quality": round(
                sum(quality(t[0]) for t in trained.generate(held_out, 1, seed=7)) / len(held_out),
                4,
            ),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
