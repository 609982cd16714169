"""Reward-model retrain on 1,000 new pairs: our training job vs a bare loop, in one run.

Ours: ``trainer.jobs.train_reward_model`` as a worker runs it (load the served model, embed every
distinct response once, Bradley–Terry on the K heads with bootstrap weights, evaluate on held-out
pairs, gate, save the checkpoint, record the version). Bare: the same model driven by hand with
the same tricks and nothing else: it loads the backbone once (as ours does), embeds each distinct
(prompt, response) once, longest first in batches (the length sort ours uses), then runs the same
number of plain AdamW epochs on the same heads over the same training split. Both time from the
same point (before the model is loaded) to the end of their work; samples/s is pairs / wall
seconds. What the bare loop does NOT do (held-out evaluation, gate, checkpoint, registry,
bootstrap weights) is work only ours pays for, so the ratio can only flatter the bare loop.

    python bench/reward_training.py --pairs 1000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import make_pair
from rlhf_core.config import BackendConfig
from rlhf_core.db import database_for
from rlhf_core.migrate import upgrade
from rlhf_core.reward_model import RewardModel, RewardModelConfig
from trainer.jobs import registry_for, train_reward_model
from trainer.reward_training import Pair, RewardTrainingConfig, split_pairs


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        item, truth = make_pair(rng, i, "p")
        label = truth if rng.random() >= 0.2 else 1 - truth
        chosen, rejected = item["responses"][label], item["responses"][1 - label]
        out.append(
            {
                "prompt": item["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "project": 1,
                "task": i,
                "annotation": i,
            }
        )
    return out


def ours(data: list[dict], data_dir: Path) -> tuple[float, dict]:
    config = BackendConfig(data_dir=data_dir, policy_training="off")
    upgrade(database_for(config))  # the schema, as `serve` and `worker` make it at start
    registry = registry_for(config)
    started = time.perf_counter()
    result = train_reward_model(config, registry, 1, data)
    return time.perf_counter() - started, result["metrics"]


def bare(data: list[dict], training: RewardTrainingConfig) -> float:
    """The same load, the same deduplicated length-sorted embedding pass, plain AdamW epochs."""
    started = time.perf_counter()
    model = RewardModel.create(RewardModelConfig())  # loads the backbone once, as ours does
    pairs = [Pair.from_record(r) for r in data]
    train, _ = split_pairs(pairs, training.heldout_fraction)  # ours trains on this split too
    texts: dict[tuple[str, str], int] = {}  # each distinct (prompt, response) embedded once
    for p in train:
        for response in (p.chosen, p.rejected):
            texts.setdefault((p.prompt, response), len(texts))
    emb = model.embed([p for p, _ in texts], [r for _, r in texts])  # (U, H), longest first
    chosen = torch.tensor([texts[(p.prompt, p.chosen)] for p in train])
    rejected = torch.tensor([texts[(p.prompt, p.rejected)] for p in train])
    heads = model.heads.train()
    optimizer = torch.optim.AdamW(
        [p for p in heads.parameters() if p.requires_grad], lr=training.learning_rate
    )
    n = len(train)
    for _ in range(training.epochs):
        order = torch.randperm(n)
        for start in range(0, n, training.batch_size):
            rows = order[start : start + training.batch_size]
            margin = heads(emb[chosen[rows]]) - heads(emb[rejected[rows]])  # (B, K)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                margin, torch.ones_like(margin)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = records(args.pairs, args.seed)
    training = RewardTrainingConfig()
    warm = RewardTrainingConfig(epochs=1)
    bare(data[:64], warm)  # warm-up for both: imports, file cache, first-call kernels
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, metrics = ours(data, Path(tmp))
    bare_s = bare(data, training)
    report = {
        "pairs": args.pairs,
        "epochs": training.epochs,
        "torch_threads": torch.get_num_threads(),
        "ours_seconds": round(ours_s, 2),
        "bare_seconds": round(bare_s, 2),
        "ours_pairs_per_s": round(args.pairs / ours_s, 1),
        "bare_pairs_per_s": round(args.pairs / bare_s, 1),
        "ratio_ours_over_bare": round(bare_s / ours_s, 3),
        "heldout_accuracy": metrics["heldout"].get("accuracy"),
        "heldout_ece": metrics["heldout"].get("ece"),
    }
    assert not math.isnan(report["ratio_ours_over_bare"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
