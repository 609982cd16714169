"""Does DPO from noisy labels move the policy towards a known preference? One run, on CPU.

The known preference: annotators like answers with many letters ``e`` (per character); each label
disagrees with that rule 20% of the time. The starting policy is the offline tiny GPT-2. It
writes two answers per training prompt, the noisy annotator picks one, and
``trainer.policy_training.train_policy`` (TRL's DPO, as the training job runs it) learns from
those labels. Then both policies answer held-out prompts with the same sampling seeds and the
rule judges each pair: the win rate counts a tie as half.

    python bench/policy_training.py --labels 1000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import OPENERS, TOPICS
from trainer.policy import Policy, PolicyConfig
from trainer.policy_training import PolicyTrainingConfig, train_policy
from trainer.reward_training import Pair


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
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as cache:
        base = Policy.load(PolicyConfig(max_new_tokens=24, batch_size=32), cache)
        pairs = labelled_pairs(base, args.labels, args.noise, args.seed)
        training = PolicyTrainingConfig(learning_rate=5e-4, epochs=2, max_length=96)
        started = time.perf_counter()
        trained, stats = train_policy(base, pairs, [], training)
        seconds = time.perf_counter() - started
        held_out = prompts(args.eval_prompts, random.Random(args.seed + 1))
        report = {
            "labels": len(pairs),
            "noise": args.noise,
            "train_seconds": round(seconds, 1),
            "dpo": stats["dpo"],
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
