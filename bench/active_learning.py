"""Active learning on every world family: every strategy, several world seeds and run seeds.

    python bench/active_learning.py --kinds uniform bradley_terry thurstone mixed_crowd \\
        near_duplicates unbalanced_topics position_bias --world-seeds 1 2 --seeds 0 1 2 \\
        --strategies random eig mixed --budget 450
    python bench/active_learning.py --merge NAME1 NAME2 --name ALL   # runs split over processes

Each world (``bench/worlds.py``) runs through ``trainer.simulate.simulate`` — the code behind
``rlhf-backend simulate`` — once per strategy and seed, evaluated against the annotators'
held-out labels (what a team has) and against the hidden utility order (the truth). Texts come
from one bank and are embedded once into a persistent ``rlhf_core.embedding_store`` file
(``--embeddings``), so runs cost head training only. Prints, per family, the mean accuracy at
the checkpoints (noisy labels and truth), the paired difference to random at ``--target-at``
labels, and the labels each strategy needs to reach random's accuracy there (read from a fitted
learning curve, and raw); writes the curves to ``bench/results/NAME.json`` and a plot to
``NAME.png``.
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
from rlhf_core import selection
from rlhf_core.config import BackendConfig
from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.reward_model import RewardModel
from rlhf_core.serving import reward_model_config
from trainer.reward_training import EmbeddingCache
from trainer.simulate import load_inputs, simulate

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("random", "margin", "batch", "eig", "adaptive", "mixed")


def labels_to_reach(curve: list[dict], target: float, key: str = "eval_accuracy") -> int | None:
    return next((p["labels"] for p in curve if p[key] >= target - 1e-9), None)


def learning_curve(xs: list[int], ys: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of ``acc(n) = a - b * n**-c`` (b >= 0, c on a grid) to a mean curve:
    smooth and never decreasing, so it can be read backwards without a noisy checkpoint
    deciding the answer. Returns (a, b, c)."""
    n = np.asarray(xs, dtype=np.float64)
    best = (float(np.mean(ys)), 0.0, 1.0, float(np.sum((ys - np.mean(ys)) ** 2)))
    for c in np.linspace(0.05, 3.0, 60):
        design = np.stack([np.ones_like(n), -(n**-c)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
        sse = float(np.sum((design @ [a, b] - ys) ** 2))
        if b >= 0 and sse < best[3]:
            best = (float(a), float(b), float(c), sse)
    return best[:3]


def fitted_labels_to_reach(xs: list[int], ys: np.ndarray, target: float) -> float | None:
    """Labels at which the fitted learning curve reaches ``target``; None beyond the last
    measured point (no extrapolation)."""
    a, b, c = learning_curve(xs, ys)
    if target <= a - b * xs[0] ** -c:
        return float(xs[0])
    if b <= 0 or target >= a:
        return None
    n = (b / (a - target)) ** (1.0 / c)
    return float(n) if n <= xs[-1] * (1 + 1e-9) else None


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


def paired_difference(mine: list[dict], base: list[dict], at: int) -> tuple[float, float]:
    """Mean and standard error of ``mine`` minus ``base`` accuracy at ``at`` labels, paired by
    world seed and run seed (same world, same cold start, same training noise)."""
    base_at = {(r["world_seed"], r["seed"]): _at(r["curve"], at) for r in base}
    diffs = [_at(r["curve"], at) - base_at[(r["world_seed"], r["seed"])] for r in mine]
    return float(np.mean(diffs)), float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))


def _at(curve: list[dict], labels: int, key: str = "eval_accuracy") -> float:
    return next(p[key] for p in curve if p["labels"] == labels)


def report(results: list[dict], kinds: list[str], strategies: list[str], args) -> None:
    """Per family: mean accuracy at the checkpoints (noisy held-out labels, truth beside it),
    the paired difference to random at ``args.target_at`` labels, and the labels each strategy
    needs to reach random's accuracy there: read from each mean curve's fitted learning curve
    (:func:`fitted_labels_to_reach`, random's own fitted value as the target) and, beside it,
    the first checkpoint of the raw mean curve at or above random's raw mean. Then the mean
    saving and the never-worse check (reaching it within ``args.target_at`` + one batch)."""
    at, batch = args.target_at, args.batch_size
    savings: dict[str, list[float]] = {s: [] for s in strategies}
    worse: dict[str, list[str]] = {s: [] for s in strategies}
    for kind in kinds:
        runs = [r for r in results if r["kind"] == kind]
        random_runs = [r for r in runs if r["strategy"] == "random"]
        ceiling = float(np.mean([r["ceiling"] for r in random_runs]))
        xs = [p["labels"] for p in random_runs[0]["curve"]]
        random_mean = mean_curve(random_runs, "eval_accuracy")
        raw_target = float(random_mean[xs.index(at)])
        a, b, c = learning_curve(xs, random_mean)
        target = a - b * at**-c
        print(
            f"\n**{kind}** (noise ceiling of the held-out labels {ceiling:.3f}; "
            f"{len(random_runs)} runs per strategy; random's @{at}: {raw_target:.3f} mean, "
            f"{target:.3f} fitted)\n"
        )
        marks = (50, 100, 200, 300, 400, 500, 700, 1000)
        checkpoints = [i for i, x in enumerate(xs) if x in marks or i == len(xs) - 1]
        head = " | ".join(f"@{xs[i]}" for i in checkpoints)
        final_truth = f" truth @{xs[-1]} |" if xs[-1] != at else ""
        print(
            f"| strategy | {head} | truth @{at} |{final_truth} of ceiling @{xs[-1]} | "
            f"Δ@{at} vs random (±1 SE) | labels to reach random's @{at}: fitted | raw |"
        )
        print("|" + " --- |" * (len(checkpoints) + 6 + bool(final_truth)))
        for strategy in strategies:
            mine = [r for r in runs if r["strategy"] == strategy]
            if not mine:
                continue
            noisy, true = mean_curve(mine, "eval_accuracy"), mean_curve(mine, "eval_accuracy_truth")
            raw = labels_to_reach(
                [{"labels": x, "eval_accuracy": v} for x, v in zip(xs, noisy)], raw_target
            )
            reach = fitted_labels_to_reach(xs, noisy, target)
            savings[strategy].append(1 - (reach or xs[-1] + batch) / at)
            if reach is None or reach > at + batch:
                worse[strategy].append(kind)
            diff, se = paired_difference(mine, random_runs, at)
            cells = " | ".join(f"{noisy[i]:.3f}" for i in checkpoints)
            truth_cells = f"{true[xs.index(at)]:.3f} |" + (
                f" {true[-1]:.3f} |" if final_truth else ""
            )
            print(
                f"| {strategy} | {cells} | {truth_cells} {noisy[-1] / ceiling:.2f} | "
                f"{diff:+.3f} ± {se:.3f} | "
                f"{f'{reach:.0f}' if reach is not None else '> ' + str(xs[-1])} | "
                f"{raw if raw is not None else '> ' + str(xs[-1])} |"
            )
    print(
        f"\nMean saving against random over the families (fitted labels to reach random's "
        f"@{at}; not reached within the run counts as {xs[-1] + batch}), and the families "
        f"where a strategy needs more than {at + batch}:"
    )
    for strategy, values in savings.items():
        if values:
            print(
                f"- {strategy}: {np.mean(values):+.0%} (per family: "
                + ", ".join(f"{v:+.0%}" for v in values)
                + f"); more than one batch behind random on: {', '.join(worse[strategy]) or 'none'}"
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
            if not mine:
                continue
            xs = [p["labels"] for p in mine[0]["curve"]]
            (line,) = ax.plot(xs, mean_curve(mine, "eval_accuracy"), marker=".", label=strategy)
            ax.plot(xs, mean_curve(mine, "eval_accuracy_truth"), ls="--", color=line.get_color())
        ax.set_title(f"{kind} (solid: noisy held-out labels, dashed: truth)", fontsize=8)
        ax.set_xlabel("labels", fontsize=8)
        ax.set_ylabel("held-out accuracy", fontsize=7)
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
    parser.add_argument(
        "--target-at", type=int, default=400, help="labels at which random's accuracy is the target"
    )
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument(
        "--mixed-share",
        type=float,
        default=selection.MIXED_RANDOM_SHARE,
        help="random share of mixed's batches (tuning only; the service uses the default)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--embeddings", type=Path, default=RESULTS / "embeddings.sqlite")
    parser.add_argument("--name", default="active_learning", help="bench/results/NAME.{json,png}")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="NAME",
        help="run nothing: report and plot bench/results/NAME.json files together (runs split "
        "over processes) as bench/results/--name.png",
    )
    args = parser.parse_args()
    if args.merge:
        results = [
            r for name in args.merge for r in json.loads((RESULTS / f"{name}.json").read_text())
        ]
        kinds = [k for k in KINDS if any(r["kind"] == k for r in results)]
        strategies = [s for s in args.strategies if any(r["strategy"] == s for r in results)]
        plot(results, kinds, strategies, RESULTS / f"{args.name}.png")
        report(results, kinds, strategies, args)
        return

    torch.set_num_threads(args.threads)
    selection.MIXED_RANDOM_SHARE = args.mixed_share
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
    report(results, args.kinds, args.strategies, args)
    print(f"\n{len(results)} runs in {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
