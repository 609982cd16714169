"""A mixed crowd: does weighting labels by annotator reliability win back what bad annotators cost?

    python bench/crowd.py --world-seeds 0 1 --seeds 0 --budget 1000

The world (``bench/worlds.py``'s pairs and careful labeller): 2,000 pool pairs drawn like
``bradley_terry``; three careful annotators (Bradley–Terry on the hidden utility, the
temperature halved as in ``mixed_crowd``), one who clicks at random and one who gives a careful
label turned round (swaps A and B); each pool pair is labelled once, by one of the five at
random, under an opaque id. No gold, no overlaps: the hard case. Three runs of
``trainer.simulate.simulate`` (the code behind ``rlhf-backend simulate``) on the same pool, the
same selection strategy and seed:

* ``ids``: the mixed labels with their annotator ids (reliability weighting);
* ``no ids``: the same labels with the ids removed (every label counts the same);
* ``careful``: the same pairs, each labelled by a careful annotator (what the bad ones cost).

Accuracy is against the hidden utility order on 500 evaluation pairs. ``recovered`` =
(ids − no ids) / (careful − no ids). ``flagged after`` = the bad annotator's own labels when
the estimator first flagged them (and kept them flagged to the end).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.worlds import _labeller, _order, _pairs, response_bank
from rlhf_core.config import BackendConfig
from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.reward_model import RewardModel
from rlhf_core.serving import reward_model_config
from trainer.reward_training import EmbeddingCache
from trainer.simulate import load_annotators, load_inputs, simulate

RESULTS = Path(__file__).parent / "results"
CAREFUL, RANDOM, SWAPPER = "careful", "random", "swapper"
CROWD = (CAREFUL, CAREFUL, CAREFUL, RANDOM, SWAPPER)


def generate_crowd(out: Path, pool_size: int, eval_size: int, seed: int) -> dict[str, str]:
    """Write pool, eval, truth and two label files (``mixed.jsonl``, ``careful.jsonl``) under
    ``out``; returns each opaque annotator id's role."""
    rng = random.Random(f"crowd:{seed}")
    bank = response_bank()
    pool, evaluation = _pairs("bradley_terry", rng, pool_size, bank), None
    evaluation = _pairs("bradley_terry", rng, eval_size, bank)
    careful = _labeller("mixed_crowd", [ua - ub for _, _, ua, _, ub in pool], rng)
    ids = [f"{rng.getrandbits(48):012x}" for _ in CROWD]
    roles = dict(zip(ids, CROWD))
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "pool.jsonl").open("w") as pool_file,
        (out / "mixed.jsonl").open("w") as mixed,
        (out / "careful.jsonl").open("w") as good,
    ):
        for i, (prompt, a, ua, b, ub) in enumerate(pool):
            pool_file.write(json.dumps({"id": f"p{i}", "prompt": prompt, "responses": [a, b]}))
            pool_file.write("\n")
            who = rng.randrange(len(ids))
            label = careful(rng, ua, ub)
            given = {CAREFUL: label, RANDOM: rng.randint(0, 1), SWAPPER: 1 - label}[CROWD[who]]
            mixed.write(json.dumps({"id": f"p{i}", "preferred": given, "annotator": ids[who]}))
            mixed.write("\n")
            good.write(json.dumps({"id": f"p{i}", "preferred": label}) + "\n")
    with (out / "eval.jsonl").open("w") as noisy, (out / "truth.jsonl").open("w") as truth:
        for i, (prompt, a, ua, b, ub) in enumerate(evaluation):
            item = {"id": f"e{i}", "prompt": prompt, "responses": [a, b]}
            noisy.write(json.dumps({**item, "preferred": careful(rng, ua, ub)}) + "\n")
            truth.write(json.dumps({**item, "preferred": _order(rng, ua, ub)}) + "\n")
    return roles


def flagged_after(curve: list[dict], annotator: str) -> int | None:
    """The annotator's own labels at the first curve point from which they stay flagged."""
    found = None
    for point in curve:
        row = (point.get("reliability") or {}).get(annotator)
        flagged = bool(row and row["flag"])
        found = (row["labels"] if found is None else found) if flagged else None
    return found


def run_world(model, cache, world_seed: int, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        roles = generate_crowd(world, args.pool, args.eval, world_seed)
        pool, mixed, _ = load_inputs(
            world / "pool.jsonl", world / "mixed.jsonl", world / "eval.jsonl"
        )
        careful = load_inputs(world / "pool.jsonl", world / "careful.jsonl", world / "eval.jsonl")[
            1
        ]
        truth = load_inputs(world / "pool.jsonl", world / "mixed.jsonl", world / "truth.jsonl")[2]
        annotators = load_annotators(world / "mixed.jsonl")
    runs = {}
    for name, labels, who in (
        ("ids", mixed, annotators),
        ("no ids", mixed, None),
        ("careful", careful, None),
    ):
        started = time.monotonic()
        runs[name] = simulate(
            model,
            pool,
            labels,
            truth,
            args.strategy,
            args.budget,
            args.batch_size,
            seed,
            cache=cache,
            annotators=who,
        )
        final = runs[name]["curve"][-1]["eval_accuracy"]
        print(
            f"world {world_seed} seed {seed} {name:8s} truth accuracy {final:.3f} "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    accuracy = {name: run["curve"][-1]["eval_accuracy"] for name, run in runs.items()}
    lost = accuracy["careful"] - accuracy["no ids"]
    final = runs["ids"]["curve"][-1].get("reliability", {})
    return {
        "world_seed": world_seed,
        "seed": seed,
        "accuracy": accuracy,
        "recovered": (accuracy["ids"] - accuracy["no ids"]) / lost if lost > 0 else None,
        "flagged_after": {
            roles[a]: flagged_after(runs["ids"]["curve"], a) for a in roles if roles[a] != CAREFUL
        },
        "wrongly_flagged": sorted(a for a, r in final.items() if r["flag"] and roles[a] == CAREFUL),
        "final_reliability": {roles[a] + ":" + a[:4]: r for a, r in final.items()},
        "curves": {name: run["curve"] for name, run in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--embeddings", type=Path, default=RESULTS / "embeddings.sqlite")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = RewardModel.create(reward_model_config(BackendConfig()))
    store = EmbeddingStore(args.embeddings)
    cache = EmbeddingCache(lambda prompts, responses: store.embed(model, prompts, responses))
    started = time.monotonic()
    results = [run_world(model, cache, w, s, args) for w in args.world_seeds for s in args.seeds]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "crowd.json").write_text(json.dumps(results, indent=1))
    print(
        "\n| world | seed | careful | no ids | ids | recovered | random flagged after | "
        "swapper flagged after | careful flagged |"
    )
    print("|" + " --- |" * 9)
    for r in results:
        a, f = r["accuracy"], r["flagged_after"]
        recovered = "n/a" if r["recovered"] is None else f"{r['recovered']:.0%}"
        print(
            f"| {r['world_seed']} | {r['seed']} | {a['careful']:.3f} | {a['no ids']:.3f} | "
            f"{a['ids']:.3f} | {recovered} | {f.get(RANDOM)} | {f.get(SWAPPER)} | "
            f"{len(r['wrongly_flagged'])} |"
        )
    mean = {k: float(np.mean([r["accuracy"][k] for r in results])) for k in results[0]["accuracy"]}
    lost = mean["careful"] - mean["no ids"]
    print(
        f"\nMean: careful {mean['careful']:.3f}, no ids {mean['no ids']:.3f}, "
        f"ids {mean['ids']:.3f}; "
        f"recovered {(mean['ids'] - mean['no ids']) / lost:.0%} of the accuracy lost "
        f"({len(results)} runs, {time.monotonic() - started:.0f} s)."
    )


if __name__ == "__main__":
    main()
