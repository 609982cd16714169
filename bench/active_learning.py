"""Active learning on every world family: every strategy, several world seeds and run seeds.

    python bench/active_learning.py --kinds uniform bradley_terry thurstone mixed_crowd \\
        near_duplicates unbalanced_topics --world-seeds 0 1 --seeds 0 1 2 --budget 400

Each world (``bench/worlds.py``) runs through ``trainer.simulate.simulate`` — the code behind
``rlhf-backend simulate`` — once per strategy and seed, evaluated against the annotators'
held-out labels (what a team has) and against the hidden utility order (the truth). Texts come
from one bank and are embedded once into a persistent ``rlhf_core.embedding_store`` file
(``--embeddings``), so runs cost head training only. Prints, per family, the mean accuracy at
the checkpoints and the labels each strategy needs to reach random's final accuracy (on the
noisy labels); writes the curves to ``bench/results/NAME.json`` and a plot to ``NAME.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.worlds import KINDS, generate
from rlhf_core.config import BackendConfig
from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.reward_model import RewardModel
from rlhf_core.serving import reward_model_config
from trainer.reward_training import EmbeddingCache
from trainer.simulate import load_inputs, simulate

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("random", "margin", "batch", "eig", "adaptive")


def labels_to_reach(curve: list[dict], target: float, key: str = "eval_accuracy") -> int | None:
    return next((p["labels"] for p in curve if p[key] >= target - 1e-9), None)


def mean_curve(runs: list[dict], key: str) -> np.ndarray:
    return np.mean([[p[key] for p in r["curve"]] for r in runs], axis=0)


def run_world(model, store, kind, world_seed, seeds, strategies, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        ceiling = generate(kind, world, args.pool, args.eval, world_seed)
        pool, labels, evaluation = load_inputs(
            world / "pool.jsonl", world / "labels.jsonl", world / "eval.jsonl"
        )
        truth = load_inputs(world / "pool.jsonl", world / "labels.jsonl", world / "truth.jsonl")[2]
    cache = EmbeddingCache(lambda prompts, responses: store.embed(model, prompts, responses))
    results = []
    for seed in seeds:
        for strategy in strategies:
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
                also_evaluate={"truth": truth},
            )
            result.update(kind=kind, world_seed=world_seed, ceiling=ceiling)
            results.append(result)
            final = result["curve"][-1]
            print(
                f"{kind} world {world_seed} seed {seed} {strategy:9s} "
                f"noisy {final['eval_accuracy']:.3f} truth {final['eval_accuracy_truth']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return results


def report(results: list[dict], kinds: list[str], strategies: list[str], budget: int) -> None:
    savings = {s: [] for s in strategies}
    for kind in kinds:
        runs = [r for r in results if r["kind"] == kind]
        ceiling = float(np.mean([r["ceiling"] for r in runs if r["strategy"] == "random"]))
        xs = [p["labels"] for p in runs[0]["curve"]]
        random_runs = [r for r in runs if r["strategy"] == "random"]
        target = mean_curve(random_runs, "eval_accuracy")[-1]
        print(
            f"\n**{kind}** (noise ceiling of the held-out labels {ceiling:.3f}; "
            f"{len(random_runs)} runs per strategy)\n"
        )
        checkpoints = [
            i for i, x in enumerate(xs) if x in (50, 100, 200, 300, 400) or i == len(xs) - 1
        ]
        head = " | ".join(f"@{xs[i]}" for i in checkpoints)
        print(
            f"| strategy | {head} | truth @{xs[-1]} | of ceiling | "
            f"labels to reach random's @{xs[-1]} |"
        )
        print("|" + " --- |" * (len(checkpoints) + 4))
        for strategy in strategies:
            mine = [r for r in runs if r["strategy"] == strategy]
            noisy, true = mean_curve(mine, "eval_accuracy"), mean_curve(mine, "eval_accuracy_truth")
            curve = [{"labels": x, "eval_accuracy": a} for x, a in zip(xs, noisy)]
            reach = labels_to_reach(curve, target)
            savings[strategy].append(1 - (reach or 2 * budget) / xs[-1])
            cells = " | ".join(f"{noisy[i]:.3f}" for i in checkpoints)
            print(
                f"| {strategy} | {cells} | {true[-1]:.3f} | {noisy[-1] / ceiling:.2f} | "
                f"{reach if reach is not None else '> ' + str(xs[-1])} |"
            )
    print("\nMean saving against random over the families (labels to reach random's final):")
    for strategy, values in savings.items():
        print(
            f"- {strategy}: {np.mean(values):+.0%} (per family: "
            + ", ".join(f"{v:+.0%}" for v in values)
            + ")"
        )


def plot(results: list[dict], kinds: list[str], strategies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for strategy in strategies:
            mine = [r for r in results if r["kind"] == kind and r["strategy"] == strategy]
            xs = [p["labels"] for p in mine[0]["curve"]]
            ax.plot(xs, mean_curve(mine, "eval_accuracy"), marker=".", label=strategy)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("labels", fontsize=8)
        ax.set_ylabel("held-out accuracy (noisy labels)", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--embeddings", type=Path, default=RESULTS / "embeddings.sqlite")
    parser.add_argument("--name", default="active_learning", help="bench/results/NAME.{json,png}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = RewardModel.create(reward_model_config(BackendConfig()))
    store = EmbeddingStore(args.embeddings)
    started = time.monotonic()
    results: list[dict] = []
    for kind in args.kinds:
        for world_seed in args.world_seeds:
            results += run_world(model, store, kind, world_seed, args.seeds, args.strategies, args)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    elapsed = time.monotonic() - started
    plot(results, args.kinds, args.strategies, RESULTS / f"{args.name}.png")
    report(results, args.kinds, args.strategies, args.budget)
    print(f"\n{len(results)} runs in {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
