"""Reward-model retrain on 1,000 new pairs: our training job vs a bare loop, in one run.

Ours: ``trainer.jobs.train_reward_model`` as a worker runs it (load the served model, embed every
response once, Bradley–Terry on the K heads with bootstrap weights, evaluate on held-out pairs,
save the checkpoint, record the version). Bare: the same backbone and the same ``EnsembleHeads``
driven by hand: a plain forward pass over the same pairs in batches, then the same number of
AdamW epochs, nothing else. Both see the same 1,000 pairs; samples/s is pairs / wall seconds.

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
from rlhf_core.reward_model import RewardModel, RewardModelConfig, resolve_backbone
from trainer.jobs import registry_for, train_reward_model
from trainer.reward_training import RewardTrainingConfig


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
    registry = registry_for(config)
    started = time.perf_counter()
    result = train_reward_model(config, registry, 1, data)
    return time.perf_counter() - started, result["metrics"]


def bare(data: list[dict], epochs: int, batch_size: int) -> float:
    """Plain forward pass + plain AdamW loop on the same backbone and heads."""
    from transformers import AutoModel, AutoTokenizer

    config = RewardModelConfig()
    started = time.perf_counter()
    model = RewardModel.create(config)  # the same weights, heads and priors as ours
    path = resolve_backbone(config.backbone)  # the offline package's directory
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path).eval()
    texts = [(r["prompt"], r[k]) for r in data for k in ("chosen", "rejected")]
    pooled = []
    with torch.inference_mode():
        for start in range(0, len(texts), config.batch_size):
            batch = texts[start : start + config.batch_size]
            enc = tokenizer(
                [p for p, _ in batch],
                [r for _, r in batch],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            )
            hidden = backbone(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"][..., None].float()
            pooled.append((hidden * mask).sum(1) / mask.sum(1))
    emb = torch.cat(pooled).clone()  # (2N, H): chosen at even rows, rejected at odd rows
    heads = model.heads.train()
    optimizer = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=1e-2)
    n = len(data)
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            margin = heads(emb[2 * rows]) - heads(emb[2 * rows + 1])  # (B, K)
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
    bare(data[:64], 1, training.batch_size)  # warm-up: imports, first-call kernels
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, metrics = ours(data, Path(tmp))
    bare_s = bare(data, training.epochs, training.batch_size)
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
