"""Active learning on the synthetic preference world: every strategy, several seeds.

    python bench/active_learning.py --seeds 0 1 2 --budget 400 --batch-size 50

For each seed a fresh world is generated (bench/synthetic_world.py, 20% annotator noise) and
every strategy runs through ``trainer.simulate.simulate`` — the same code as
``rlhf-backend simulate``. The backbone is frozen, so texts are embedded once per world and
shared by the strategies. Prints a Markdown table (accuracy and ECE at checkpoints, labels
``default`` needs to reach ``random``'s final accuracy) and writes the curves to
``bench/results/active_learning.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import generate
from ml_backend.config import BackendConfig
from ml_backend.serving import reward_model_config
from trainer.reward_model import RewardModel
from trainer.reward_training import EmbeddingCache
from trainer.selection import DEFAULT_SELECTION, SELECTION_STRATEGIES
from trainer.simulate import load_inputs, plot_curves, simulate

RESULTS = Path(__file__).parent / "results"


def labels_to_reach(curve: list[dict], target: float) -> int | None:
    return next((p["labels"] for p in curve if p["eval_accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.2, help="annotator disagreement rate")
    parser.add_argument(
        "--world-seed", type=int, default=1000, help="world i is generated from world-seed + i"
    )
    parser.add_argument("--name", default="active_learning", help="bench/results/NAME.{json,png}")
    parser.add_argument("--strategies", nargs="+", default=list(SELECTION_STRATEGIES))
    args = parser.parse_args()

    model = RewardModel.create(reward_model_config(BackendConfig()))
    results: list[dict] = []
    started = time.monotonic()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            world = Path(tmp)
            generate(world, args.pool, args.eval, noise=args.noise, seed=args.world_seed + seed)
            pool, labels, evaluation = load_inputs(
                world / "pool.jsonl", world / "labels.jsonl", world / "eval.jsonl"
            )
        cache = EmbeddingCache(model.embed)
        for strategy in args.strategies:
            result = simulate(
                model,
                pool,
                labels,
                evaluation,
                strategy,
                args.budget,
                args.batch_size,
                seed,
                cache=cache,
            )
            results.append(result)
            final = result["curve"][-1]
            print(
                f"seed {seed} {strategy:9s} final acc {final['eval_accuracy']:.3f}", file=sys.stderr
            )
    elapsed = time.monotonic() - started

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    mean_curves = {}
    for strategy in args.strategies:
        runs = [r for r in results if r["strategy"] == strategy]
        xs = [p["labels"] for p in runs[0]["curve"]]
        acc = np.mean([[p["eval_accuracy"] for p in r["curve"]] for r in runs], axis=0)
        ece = np.mean([[p["eval_ece"] for p in r["curve"]] for r in runs], axis=0)
        mean_curves[strategy] = {
            "strategy": strategy,
            "seed": "mean",
            "curve": [
                {"labels": x, "eval_accuracy": float(a), "eval_ece": float(e)}
                for x, a, e in zip(xs, acc, ece)
            ],
        }
    plot_curves(
        list(mean_curves.values()),
        RESULTS / f"{args.name}.png",
        f"mean over seeds {args.seeds}, {args.noise:.0%} annotator noise",
    )

    checkpoints = mean_curves["random"]["curve"]
    header = " | ".join(f"acc@{p['labels']}" for p in checkpoints)
    print(
        f"| strategy | {header} | ECE@{checkpoints[-1]['labels']} "
        "| labels to reach random's final |"
    )
    print("|" + " --- |" * (len(checkpoints) + 3))
    target = checkpoints[-1]["eval_accuracy"]
    for strategy, mean in mean_curves.items():
        accs = " | ".join(f"{p['eval_accuracy']:.3f}" for p in mean["curve"])
        reach = labels_to_reach(mean["curve"], target)
        name = f"{strategy} (default)" if strategy == DEFAULT_SELECTION else strategy
        print(
            f"| {name} | {accs} | {mean['curve'][-1]['eval_ece']:.3f} | "
            f"{reach if reach is not None else '> ' + str(args.budget)} |"
        )
    default_reach = labels_to_reach(mean_curves[DEFAULT_SELECTION]["curve"], target)
    if default_reach is not None:
        saving = 1 - default_reach / checkpoints[-1]["labels"]
        print(
            f"\n`default` ({DEFAULT_SELECTION}) reaches random's final accuracy {target:.3f} "
            f"with {default_reach} labels: {saving:.0%} fewer than random's "
            f"{checkpoints[-1]['labels']}."
        )
    print("\nPer seed, labels each strategy needs to reach random's final accuracy in that seed:")
    for seed in args.seeds:
        runs = {r["strategy"]: r["curve"] for r in results if r["seed"] == seed}
        seed_target = runs["random"][-1]["eval_accuracy"]
        reached = ", ".join(
            f"{name} {labels_to_reach(curve, seed_target) or '> ' + str(args.budget)}"
            for name, curve in runs.items()
        )
        print(f"- seed {seed} (random: {seed_target:.3f}): {reached}")
    print(f"\n{len(results)} runs in {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
