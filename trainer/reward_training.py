"""Bradley–Terry training of the reward-model ensemble on human preference pairs.

The backbone stays frozen and every distinct (prompt, response) is embedded once per run, so a
retrain costs one backbone pass over the new texts plus a few hundred cheap head updates. Each
head trains on its own bootstrap resample of the pairs (Poisson(1) weights), which is what makes
the heads disagree where the data is thin: the epistemic uncertainty active learning feeds on.
Ties train towards p = 0.5 rather than being dropped. A graded pair ("A is significantly
better") carries a margin m, and its loss is Llama 2's -log sigmoid(r_chosen - r_rejected - m):
the stronger the preference, the wider the reward gap it asks for.

TRL's RewardTrainer fine-tunes one scalar head through the whole model per step; that is the
wrong tool for an ensemble on cached embeddings retrained after every batch of labels, so this
loop is ours (about 40 lines). Policy training uses TRL (DPO).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rlhf_core.acquisition import Posterior, pair_features, prior_precision
from rlhf_core.fields import documented
from rlhf_core.reliability import Reliability, ReliabilityConfig, estimate_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardTrainingConfig:
    epochs: int = documented(100, "Passes over the training pairs.")
    learning_rate: float = documented(3e-3, "Adam learning rate (heads).")
    weight_decay: float = documented(1e-3, "L2 on the head weights.")
    batch_size: int = documented(256, "Pairs per optimisation step.")
    bootstrap: bool = documented(True, "Poisson(1) resample per head.")
    heldout_fraction: float = documented(
        0.15, "Share of tasks held out for evaluation (stable split)."
    )
    promotion_tolerance: float = documented(
        0.02, "Promote unless held-out accuracy drops by more than this."
    )
    min_heldout_pairs: int = documented(
        30,
        "Decisive held-out pairs needed before the held-out comparison counts; below that the "
        "gate compares on every labelled pair and says so.",
    )
    seed: int = documented(0, "Seed for bootstrap weights and shuffling.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    tie: bool = False
    annotator: int | str | None = None
    group: str = ""  # what the held-out split is keyed on (the task), so no task leaks
    weight: float = 1.0  # what the label counts in the loss (rlhf_core.reliability)
    gold: bool = False  # from an annotation Label Studio marks as ground truth
    margin: float = 0.0  # a graded preference's Bradley–Terry margin (0: ungraded)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Pair:
        return cls(
            prompt=record["prompt"],
            chosen=record["chosen"],
            rejected=record["rejected"],
            tie=bool(record.get("tie")),
            annotator=record.get("annotator"),
            group=f"{record.get('project')}:{record.get('task')}",
            gold=bool(record.get("ground_truth")),
            margin=float(record.get("margin") or 0.0),
        )


def is_heldout(group: str, fraction: float) -> bool:
    """A stable split: the same task is held out in every retrain, whatever else arrives."""
    digest = hashlib.sha256(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_pairs(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    train = [p for p in pairs if not is_heldout(p.group, fraction)]
    heldout = [p for p in pairs if is_heldout(p.group, fraction)]
    return train, heldout


def pair_weights(pairs: list[Pair]) -> torch.Tensor:
    """Each pair's weight in the loss: (N,)."""
    return torch.tensor([p.weight for p in pairs], dtype=torch.float32)


EmbedFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> (N, H)
HeadFn = Callable[[torch.Tensor], torch.Tensor]  # (N, H) -> (N, K)


class EmbeddingCache:
    """Embeds each distinct (prompt, response) once; pairs become row indices."""

    def __init__(self, embed: EmbedFn) -> None:
        self.embed = embed
        self.index: dict[tuple[str, str], int] = {}
        self.rows: list[torch.Tensor] = []

    def add(self, pairs: list[Pair]) -> None:
        new = []
        for p in pairs:
            for response in (p.chosen, p.rejected):
                key = (p.prompt, response)
                if key not in self.index:
                    self.index[key] = len(self.index)
                    new.append(key)
        if new:
            with torch.inference_mode():
                emb = self.embed([k[0] for k in new], [k[1] for k in new])
            self.rows.append(emb.float().cpu())

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)

    def pair_indices(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = torch.tensor([self.index[(p.prompt, p.chosen)] for p in pairs])
        rejected = torch.tensor([self.index[(p.prompt, p.rejected)] for p in pairs])
        target = torch.tensor([0.5 if p.tie else 1.0 for p in pairs])
        return chosen, rejected, target


def with_reliability(
    pairs: list[Pair],
    cache: EmbeddingCache,
    prior_scale: float,
    config: ReliabilityConfig | None = None,
) -> tuple[list[Pair], Reliability]:
    """``pairs`` weighted by their annotators' reliability (:mod:`rlhf_core.reliability`, a
    flagged swapper's turned round), estimated on the frozen embeddings in ``cache`` (which
    holds every pair's texts): what the service's training job and the simulator both train
    on. With fewer than two annotators and no gold there is nothing to compare: unchanged."""
    if len({str(p.annotator) for p in pairs}) < 2 and not any(p.gold for p in pairs):
        return list(pairs), Reliability({})
    emb = cache.matrix().numpy()
    chosen, rejected, _ = cache.pair_indices(pairs)
    features = pair_features(emb[chosen], emb[rejected])  # (N, H), as labelled
    reliability = estimate_pairs(
        pairs, features, prior_precision(emb.shape[1], prior_scale), config
    )
    return reliability.weigh(pairs), reliability


def pair_margins(pairs: list[Pair]) -> torch.Tensor:
    """Each pair's Bradley–Terry margin (N,): 0 for ungraded pairs and ties."""
    return torch.tensor([0.0 if p.tie else p.margin for p in pairs])


def train_heads(
    heads: torch.nn.Module,
    head_fn: HeadFn,
    embeddings: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    target: torch.Tensor,
    num_heads: int,
    config: RewardTrainingConfig,
    on_step: Callable[[int, int, float], None] | None = None,
    pair_weight: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
) -> dict[str, float]:
    """Bradley–Terry on (chosen, rejected) rows of ``embeddings`` (N, H); returns loss stats.

    ``pair_weight`` (N,): what each label counts (:func:`pair_weights`), so the loss is
    ``-w · log σ(r_c - r_r - m)`` averaged over the weights; ``margins`` (N,): each pair's
    required reward gap m (:func:`pair_margins`; default 0)."""
    generator = torch.Generator().manual_seed(config.seed)
    n = len(chosen)
    margins = torch.zeros(n) if margins is None else margins
    if config.bootstrap:  # (n, K) Poisson(1) weights: each head sees its own resample
        weights = torch.poisson(torch.ones(n, num_heads), generator=generator)
    else:
        weights = torch.ones(n, num_heads)
    if pair_weight is not None:
        weights = weights * pair_weight[:, None]
    optimizer = torch.optim.AdamW(
        [p for p in heads.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    step, last = 0, float("nan")
    heads.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            margin = (  # Llama 2: -log sigmoid(r_chosen - r_rejected - m), (B, K)
                head_fn(embeddings[chosen[batch]])
                - head_fn(embeddings[rejected[batch]])
                - margins[batch, None]
            )
            loss_per = torch.nn.functional.binary_cross_entropy_with_logits(
                margin, target[batch, None].expand_as(margin), reduction="none"
            )  # (B, K)
            w = weights[batch]
            loss = (loss_per * w).sum() / w.sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last = float(loss.detach())
            if on_step is not None:
                on_step(step, total, last)
    heads.eval()
    return {"steps": step, "final_loss": last}


@dataclass(frozen=True)
class Evaluation:
    n_pairs: int
    accuracy: float | None  # on non-tie pairs
    ece: float | None  # expected calibration error of P(chosen > rejected), 10 bins
    mean_uncertainty: float | None
    per_annotator: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def preference_probabilities(
    head_fn: HeadFn, embeddings: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> np.ndarray:
    """Per-head P(chosen > rejected): (P, K)."""
    with torch.inference_mode():
        margin = head_fn(embeddings[chosen]) - head_fn(embeddings[rejected])
        return torch.sigmoid(margin).float().numpy()


def laplace_posterior(
    head_fn: HeadFn,
    embeddings: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    prior_scale: float,
) -> Posterior:
    """The Laplace posterior of a linear reward on these labelled pairs, at the heads' mean
    probabilities: what :func:`rlhf_core.selection.rank` measures information against."""
    emb = embeddings.float().numpy()
    precision = prior_precision(emb.shape[1], prior_scale)
    if len(chosen) == 0:
        return Posterior.prior(emb.shape[1], precision)
    p = preference_probabilities(head_fn, embeddings, chosen, rejected).mean(axis=1)
    return Posterior.fit(pair_features(emb[chosen], emb[rejected]), p, precision)


def expected_calibration_error(p_chosen: np.ndarray, bins: int = 10) -> float:
    """ECE of the predicted preference: confidence max(p, 1-p) vs. being right, in ``bins``."""
    confidence = np.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for low, high in pairwise(edges):
        in_bin = (confidence >= low) & ((confidence < high) | (high == 1.0))
        if in_bin.any():
            ece += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def evaluate(pairs: list[Pair], p_heads: np.ndarray) -> Evaluation:
    if len(pairs) == 0:
        return Evaluation(0, None, None, None, {})
    p = p_heads.mean(axis=1)
    decisive = np.array([not pair.tie for pair in pairs])
    accuracy = float((p[decisive] > 0.5).mean()) if decisive.any() else None
    ece = expected_calibration_error(p[decisive]) if decisive.any() else None
    by_annotator: dict[str, list[bool]] = defaultdict(list)
    for pair, prob, keep in zip(pairs, p, decisive):
        if keep:
            by_annotator[str(pair.annotator)].append(bool(prob > 0.5))
    per_annotator = {a: float(np.mean(v)) for a, v in sorted(by_annotator.items())}
    return Evaluation(
        n_pairs=len(pairs),
        accuracy=accuracy,
        ece=ece,
        mean_uncertainty=float(p_heads.std(axis=1).mean()),
        per_annotator=per_annotator,
    )


@dataclass(frozen=True)
class GateDecision:
    """A promotion decision and its evidence: the rule applied, n, and the interval."""

    promote: bool
    reason: str
    evidence: dict[str, Any]


def paired_bootstrap_interval(
    differences: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired per-item ``differences`` (n,)."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)  # (R,)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def correct_choices(head_fn: HeadFn, cache: EmbeddingCache, pairs: list[Pair]) -> np.ndarray:
    """Per decisive (non-tie) pair of ``pairs`` (texts embedded in ``cache``), 1.0 where the
    heads' mean P(chosen > rejected) > 0.5, else 0.0: (D,) floats. No pairs: an empty (0,)
    array, and neither the cache (an empty one has no rows to index) nor the heads are asked."""
    if not pairs:
        return np.zeros(0)
    chosen, rejected, _ = cache.pair_indices(pairs)
    p_heads = preference_probabilities(head_fn, cache.matrix(), chosen, rejected)  # (P, K)
    decisive = np.array([not pair.tie for pair in pairs], dtype=bool)
    return (p_heads.mean(axis=1)[decisive] > 0.5).astype(float)


def should_promote(
    candidate_correct: np.ndarray,
    serving_correct: np.ndarray,
    tolerance: float,
    min_pairs: int,
    confidence: float = 0.95,
    in_sample: bool = False,
) -> GateDecision:
    """The reward-model gate: non-inferiority of the candidate on paired pairs.

    ``*_correct`` say, per decisive pair (the same pairs for both), whether each model ranks it
    right. Promote when the lower end of the paired-bootstrap interval of the accuracy
    difference (candidate - serving) is at least ``-tolerance``. Held-out pairs count only from
    ``min_pairs`` on; until then the caller passes every labelled pair (``in_sample``, an
    optimistic comparison for the candidate, which learned from them), the rule is the point
    estimate of the difference against ``-tolerance`` (the interval is still recorded), and the
    reason says so.
    """
    n = len(candidate_correct)
    rule = "in-sample (held-out below minimum)" if in_sample else "held-out non-inferiority"
    evidence: dict[str, Any] = {
        "rule": rule,
        "n": n,
        "min_heldout": min_pairs,
        "tolerance": tolerance,
        "confidence": confidence,
    }
    if n == 0:
        return GateDecision(
            True, "no decisive pairs to compare on: promoted (nothing to lose)", evidence
        )
    difference = candidate_correct - serving_correct  # (n,) in {-1, 0, 1}
    low, high = paired_bootstrap_interval(difference, confidence)
    evidence.update(
        candidate_accuracy=float(candidate_correct.mean()),
        serving_accuracy=float(serving_correct.mean()),
        difference=float(difference.mean()),
        ci_low=low,
        ci_high=high,
    )
    interval = (
        f"accuracy {evidence['candidate_accuracy']:.3f} vs serving "
        f"{evidence['serving_accuracy']:.3f} on {n} pairs, difference {difference.mean():+.3f} "
        f"({confidence:.0%} interval {low:+.3f}..{high:+.3f})"
    )
    if in_sample:  # an interval on pairs the candidate learned from means little: the estimate
        promote = float(difference.mean()) >= -tolerance
        verdict = "not below" if promote else "below"
        reason = (
            f"{rule}: {interval}; difference {verdict} -{tolerance} "
            f"(held-out pairs count from {min_pairs} on)"
        )
    else:
        promote = low >= -tolerance
        verdict = "not below" if promote else "below"
        reason = f"{rule}: {interval}; lower end {verdict} -{tolerance}"
    return GateDecision(promote, reason, evidence)


class Progress:
    """Step, loss and ETA while training runs: logged, passed to ``report`` (the job's row in
    the store, read by ``/metrics``), and drawn as a progress bar when stderr is a terminal."""

    def __init__(self, label: str, report: Callable[[dict[str, float]], None] | None = None):
        self.label = label
        self.report = report
        self.started = time.monotonic()
        self.last_log = 0.0
        self._bar: Any = None

    def __call__(self, step: int, total: int, loss: float) -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (total - step) if step else float("nan")
        state = {"step": step, "total": total, "loss": loss, "eta_s": eta}
        if self.report is not None:
            self.report(state)
        self._draw(step, total, loss)
        if time.monotonic() - self.last_log > 5.0 or step == total:
            self.last_log = time.monotonic()
            logger.info("%s: step %d/%d loss %.4f eta %.0fs", self.label, step, total, loss, eta)

    def _draw(self, step: int, total: int, loss: float) -> None:
        if self._bar is None:  # disable=None: no bar unless stderr is a terminal (the CLI)
            self._bar = tqdm(total=total, desc=self.label, unit="step", disable=None)
        self._bar.total = total
        self._bar.n = step
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.refresh()
        if step >= total:
            self._bar.close()
