"""Graded preferences: reward-model accuracy with the strength as a margin, against the same
labels without it, at 400 labels.

An annotator sees each pair of responses (drawn from ``bench.worlds.response_bank``: the texts
every world uses, with their hidden utility), perceives the utility gap with noise and answers
as in ``label_configs/graded.xml``: which one is better, and by how much. The strength is the
quartile of the perceived gap over the pool (top quarter "significantly", then "better",
"slightly", "negligibly / unsure"), so it tracks what the annotator saw, not the truth. Where
both responses are among the worst tenth of the bank the annotator says "Both are bad": no pair
(excluded from the pair loss in every arm, as in the service).

Worlds (each with its own annotator noise, three seeds each):

* ``thurstone_80``: perceived gap = true gap + Gaussian noise, the noise set so that 80% of the
  labels agree with the utility order (as ``bench/worlds.py``'s Bradley–Terry world);
* ``thurstone_90``: the same, 90% agreement;
* ``uniform_flips``: the strength follows the true gap, but one label in five names the other
  response, strength unchanged (a careless click keeps its confident strength).

Arms, each trained exactly as a training job trains (frozen MiniLM embeddings, the K ensemble
heads from the same initialisation, ``RewardTrainingConfig()``'s defaults, the same pairs in the
same order): ``none`` (margin 0 for every pair: the labels without their strength), ``llama2``
(the default ``STRENGTH_MARGINS``: 1, 2/3, 1/3, 0) and ``llama2_large`` (Llama 2's large
margins: 3, 2, 1, 0). Accuracy is on 500 evaluation pairs against the utility order (exact ties
left out).

    python bench/graded.py --labels 400 --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import OPENERS
from bench.worlds import response_bank
from rlhf_core.label_schema import STRENGTH_MARGINS
from rlhf_core.reward_model import RewardModel, RewardModelConfig
from trainer.reward_training import (
    EmbeddingCache,
    Pair,
    RewardTrainingConfig,
    pair_margins,
    preference_probabilities,
    train_heads,
)

WORLDS = ("thurstone_80", "thurstone_90", "uniform_flips")
LEVELS = ("negligibly", "slightly", "better", "significantly")  # quartiles of the perceived gap
ARMS = {
    "none": {level: 0.0 for level in LEVELS},
    "llama2": STRENGTH_MARGINS,
    "llama2_large": {level: 3.0 * m for level, m in STRENGTH_MARGINS.items()},
}


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _noise_for(agreement: float, gaps: list[float]) -> float:
    """Gaussian noise sd such that sign(gap + noise) = sign(gap) on ``agreement`` of ``gaps``."""
    low, high = 1e-3, 100.0
    for _ in range(60):
        sd = math.sqrt(low * high)
        agree = statistics.fmean(_phi(abs(g) / sd) for g in gaps if g)
        low, high = (sd, high) if agree > agreement else (low, sd)
    return math.sqrt(low * high)


def draw_pairs(rng: random.Random, n: int, bank: dict) -> list[tuple[str, str, float, str, float]]:
    pairs = []
    topics = list(bank)
    while len(pairs) < n:
        topic = rng.choice(topics)
        (a, ua), (b, ub) = rng.sample(bank[topic], 2)
        pairs.append((rng.choice(OPENERS).format(t=topic), a, ua, b, ub))
    return pairs


def graded_labels(world: str, pool: list, bad_below: float, rng: random.Random) -> list[dict]:
    """The annotator's answers as conversion stores them: preference records with a strength,
    or nothing for "both bad"."""
    gaps = [ua - ub for _, _, ua, _, ub in pool]
    sd = _noise_for(0.8 if world != "thurstone_90" else 0.9, gaps)
    perceived = []
    for gap in gaps:
        if world == "uniform_flips":
            perceived.append(gap if rng.random() >= 0.2 else -gap)
        else:
            perceived.append(gap + rng.gauss(0.0, sd))
    cuts = statistics.quantiles([abs(p) for p in perceived], n=4)
    records = []
    for i, ((prompt, a, ua, b, ub), seen) in enumerate(zip(pool, perceived, strict=True)):
        if ua < bad_below and ub < bad_below:
            continue  # "Both are bad": undesirable examples for KTO, never a pair
        level = LEVELS[sum(abs(seen) > c for c in cuts)]
        chosen, rejected = (a, b) if seen > 0 else (b, a)
        records.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strength": level}
            | {"project": 1, "task": i, "annotation": i}
        )
    return records


def accuracy(model: RewardModel, cache: EmbeddingCache, truth: list[Pair]) -> float:
    chosen, rejected, _ = cache.pair_indices(truth)
    p = preference_probabilities(model.head_rewards, cache.matrix(), chosen, rejected)
    return float((p.mean(axis=1) > 0.5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=400)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    bank = response_bank()
    utilities = sorted(u for texts in bank.values() for _, u in texts)
    bad_below = utilities[len(utilities) // 10]
    model = RewardModel.create(RewardModelConfig())
    initial = copy.deepcopy(model.heads.state_dict())
    cache = EmbeddingCache(model.embed)
    training = RewardTrainingConfig()
    rows = []
    for world in WORLDS:
        for seed in range(args.seeds):
            rng = random.Random(f"graded:{world}:{seed}")
            pool = draw_pairs(rng, args.labels, bank)
            records = graded_labels(world, pool, bad_below, rng)
            truth = [
                Pair(p, a if ua > ub else b, b if ua > ub else a)
                for p, a, ua, b, ub in draw_pairs(rng, args.eval, bank)
                if ua != ub
            ]
            cache.add([Pair.from_record(r) for r in records] + truth)
            row = {"world": world, "seed": seed, "pairs": len(records)}
            for arm, margins in ARMS.items():
                pairs = [Pair.from_record({**r, "margin": margins[r["strength"]]}) for r in records]
                chosen, rejected, target = cache.pair_indices(pairs)
                model.heads.load_state_dict(initial)
                train_heads(
                    model.heads,
                    model.head_rewards,
                    cache.matrix(),
                    chosen,
                    rejected,
                    target,
                    model.config.num_heads,
                    training,
                    margins=pair_margins(pairs),
                )
                row[arm] = round(accuracy(model, cache, truth), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for world in WORLDS:
        mine = [r for r in rows if r["world"] == world]
        summary[world] = {arm: round(statistics.fmean(r[arm] for r in mine), 4) for arm in ARMS}
        summary[world]["llama2_minus_none"] = round(
            statistics.fmean(r["llama2"] - r["none"] for r in mine), 4
        )
    print(json.dumps({"labels": args.labels, "eval": args.eval, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
