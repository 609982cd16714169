"""A project at a glance: model versions, jobs, annotators and the policy leaderboard.

The one source of the dashboard's figures and of ``GET /api/projects/<id>/summary``. Everything
is read from the store and the registry; nothing here loads a model.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from rlhf_core.arena import comparisons, reward_model_win_rates
from rlhf_core.conversion import preference_pairs
from rlhf_core.leaderboard import Comparison, leaderboard

# The registry is the trainer's; reading it is the only thing the HTTP face needs from there.
from rlhf_core.registry import POLICY, REWARD_MODEL, ModelVersion, Registry
from rlhf_core.store import JOB_QUEUED, JOB_RUNNING, Store

WILSON_Z = 1.96


def project_summary(store: Store, registry: Registry, project_id: int) -> dict[str, Any]:
    preferences = preference_pairs(
        store.records(project_id, "preference"), store.records(project_id, "ranking")
    )
    arena_rows = store.arena_responses(project_id)
    board = _leaderboard(tuple(comparisons(preferences, arena_rows)))
    reward_model = registry.served(project_id, REWARD_MODEL)
    return {
        "project": project_id,
        "served": registry.served_version(project_id),
        "pinned": {
            kind: {"version": pin.version, "reason": pin.reason}
            for kind, pin in registry.pins(project_id).items()
        },
        "disk_bytes": registry.disk_usage(project_id),
        "versions": versions(registry, project_id),
        "jobs": jobs(store, project_id),
        "annotators": annotators(store, preferences, reward_model),
        "agreement": project_agreement(preferences),
        "labels": label_counts(preferences, store.records(project_id, "unpaired")),
        "leaderboard": with_reward_model_rates(board["rows"], reward_model_win_rates(arena_rows)),
        "arena": {
            "tasks": len({row["task_id"] for row in arena_rows}),
            "length_coefficient": board["length_coefficient"],
            "length_ci": board["length_ci"],
        },
    }


@functools.lru_cache(maxsize=16)
def _leaderboard(verdicts: tuple[Comparison, ...]) -> dict[str, Any]:
    """The fit with its bootstrap (a second or so for thousands of verdicts), once per set of
    verdicts: the dashboard reloads every few seconds while a job runs."""
    return leaderboard(verdicts)


def busy(summary: dict[str, Any]) -> bool:
    """Whether a job is queued or running (the dashboard then refreshes itself)."""
    return any(job["status"] in (JOB_QUEUED, JOB_RUNNING) for job in summary["jobs"])


def versions(registry: Registry, project_id: int) -> list[dict[str, Any]]:
    """Every trained version, oldest first, with its decision and the evidence behind it."""
    served = {kind: registry.served(project_id, kind).version for kind in (REWARD_MODEL, POLICY)}
    rows = [
        _version_row(v, served[v.kind])
        for v in registry.versions(project_id)
        if v.kind in (REWARD_MODEL, POLICY)
    ]
    return sorted(rows, key=lambda row: (row["created_at"], row["version"]))


def _version_row(version: ModelVersion, served: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": version.kind,
        "version": version.version,
        "status": version.status,
        "served": version.version == served,
        "reason": version.reason,
        "created_at": version.created_at,
        "labels": len(version.data_snapshot.get("annotations", [])),
        "records": version.data_snapshot.get("records"),
    }
    metrics = version.metrics
    if version.kind == REWARD_MODEL:
        heldout = metrics.get("heldout") or {}
        accuracy, n = heldout.get("accuracy"), metrics.get("heldout_pairs", 0)
        row.update(
            accuracy=accuracy,
            accuracy_ci=wilson_interval(accuracy, n) if accuracy is not None else None,
            heldout_pairs=n,
            ece=heldout.get("ece"),
            train_pairs=metrics.get("train_pairs"),
        )
    else:
        gate = metrics.get("gate") or {}
        win_rate = gate.get("win_rate")
        row.update(
            gate_win_rate=None if win_rate is None or math.isnan(win_rate) else win_rate,
            gate_prompts=gate.get("prompts"),
            judge=metrics.get("judge"),
        )
    if "evidence" in metrics:  # the gate's own evidence, where the trainer records it
        row["evidence"] = metrics["evidence"]
    elif "rule" in (metrics.get("gate") or {}):  # trainer.jobs: rule, n, interval
        row["evidence"] = metrics["gate"]
    return row


def wilson_interval(proportion: float, n: int, z: float = WILSON_Z) -> list[float] | None:
    """95% Wilson score interval of a proportion observed on ``n`` trials."""
    if n <= 0:
        return None
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n))
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def jobs(store: Store, project_id: int) -> list[dict[str, Any]]:
    """The project's newest jobs: status, live progress while running, the reason if failed."""
    rows = []
    for job in store.job_history(project_id):
        progress = job["progress"] or {}
        eta = progress.get("eta_s")
        rows.append(
            {
                "job": job["job_id"],
                "kind": job["kind"],
                "status": job["status"],
                "trigger": job["trigger"],
                "attempts": job["attempts"],
                "created_at": job["created_at"],
                "started_at": job["started_at"],
                "finished_at": job["finished_at"],
                "phase": progress.get("phase"),
                "step": progress.get("step"),
                "total": progress.get("total"),
                "loss": progress.get("loss"),
                "eta_s": eta if isinstance(eta, int | float) and eta == eta else None,
                "error": job["error"],
            }
        )
    return rows


def annotators(
    store: Store, preferences: list[dict[str, Any]], reward_model: ModelVersion
) -> list[dict[str, Any]]:
    """Per annotator: labels given (and skipped), preference pairs, agreement with the other
    annotators on the pairs both judged (share and Cohen's κ), accuracy on gold pairs, the
    served reward model's held-out agreement, and the reliability it was trained with."""
    pairs: dict[str, int] = defaultdict(int)
    for record in preferences:
        pairs[str(record.get("annotator"))] += 1
    agreement = inter_annotator_agreement(preferences)
    kappa = annotator_kappa(preferences)
    gold = gold_accuracy(preferences)
    with_model = (reward_model.metrics.get("heldout") or {}).get("per_annotator") or {}
    reliability = (reward_model.metrics.get("reliability") or {}).get("annotators") or {}
    rows = []
    for annotator, (labels, skipped) in sorted(
        store.annotator_counts(reward_model.project_id).items(), key=lambda item: str(item[0])
    ):
        key = str(annotator)
        agreed, shared = agreement.get(key, (None, 0))
        on_gold, gold_n = gold.get(key, (None, 0))
        trusted = reliability.get(key) or {}
        rows.append(
            {
                "annotator": annotator,
                "labels": labels,
                "skipped": skipped,
                "pairs": pairs.get(key, 0),
                "agreement": agreed,
                "agreement_n": shared,
                "kappa": kappa.get(key),
                "gold_accuracy": on_gold,
                "gold_n": gold_n,
                "model_agreement": with_model.get(key),
                "reliability": trusted.get("reliability"),
                "flag": trusted.get("flag") or None,
            }
        )
    return rows


TIE = "tie"


def verdicts(preferences: Iterable[dict[str, Any]]) -> dict[tuple[Any, str, str], dict[str, str]]:
    """Each comparison (task, and its two responses in text order) with every annotator's
    verdict on it: ``first``, ``second`` or ``tie`` (in that order; a later record of the same
    annotator on the same comparison replaces an earlier one)."""
    found: dict[tuple[Any, str, str], dict[str, str]] = defaultdict(dict)
    for record in preferences:
        chosen, rejected = str(record.get("chosen")), str(record.get("rejected"))
        low, high = sorted((chosen, rejected))
        verdict = TIE if record.get("tie") else "first" if chosen == low else "second"
        found[(record.get("task"), low, high)][str(record.get("annotator"))] = verdict
    return found


def inter_annotator_agreement(
    preferences: Iterable[dict[str, Any]],
) -> dict[str, tuple[float, int]]:
    """Per annotator, the share of their verdicts that another annotator gave too on the same
    pair of responses of the same task (a tie is its own verdict), and how many such overlaps."""
    agreed: dict[str, list[bool]] = defaultdict(list)
    for by_annotator in verdicts(preferences).values():
        for annotator, verdict in by_annotator.items():
            for other, theirs in by_annotator.items():
                if other != annotator:
                    agreed[annotator].append(verdict == theirs)
    return {a: (round(sum(v) / len(v), 4), len(v)) for a, v in agreed.items()}


def annotator_kappa(preferences: Iterable[dict[str, Any]]) -> dict[str, float | None]:
    """Per annotator, Cohen's κ of their verdicts against the other annotators' on the same
    comparisons: (observed − chance agreement) / (1 − chance), chance from the two sides'
    verdict shares. None where chance agreement is 1 (κ undefined) or nothing overlaps."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for by_annotator in verdicts(preferences).values():
        for annotator, verdict in by_annotator.items():
            pairs[annotator] += [(verdict, t) for o, t in by_annotator.items() if o != annotator]
    kappas: dict[str, float | None] = {}
    for annotator, together in pairs.items():
        if not together:  # every comparison of theirs was judged by them alone
            kappas[annotator] = None
            continue
        observed = sum(mine == theirs for mine, theirs in together) / len(together)
        mine = Counter(m for m, _ in together)
        theirs = Counter(t for _, t in together)
        chance = sum(mine[c] * theirs[c] for c in mine) / len(together) ** 2
        kappas[annotator] = None if chance >= 1.0 else round((observed - chance) / (1 - chance), 4)
    return kappas


def project_agreement(preferences: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Agreement over every comparison at least two annotators judged: ``percent`` (the share
    of agreeing pairs of verdicts) and Krippendorff's α for nominal data (1 − observed / expected
    disagreement, from the coincidence matrix); ``items`` and ``labels`` they rest on.

    Two annotators agree on tasks 1 and 2 and disagree on 3: coincidences (first, first) 2,
    (second, second) 2, (first, second) 1, (second, first) 1; n = 6, 3 of each value; α =
    1 − (6 − 1) · 2 / (3 · 3 + 3 · 3) = 0.4444.

    >>> def label(task, chosen, rejected, annotator):
    ...     return {"task": task, "chosen": chosen, "rejected": rejected, "annotator": annotator}
    >>> project_agreement([label(1, "a", "b", 1), label(1, "a", "b", 2), label(2, "d", "c", 1),
    ...                    label(2, "d", "c", 2), label(3, "e", "f", 1), label(3, "f", "e", 2)])
    {'items': 3, 'labels': 6, 'percent': 0.6667, 'alpha': 0.4444}
    """
    coincidence: dict[tuple[str, str], float] = defaultdict(float)
    agree = total = items = labels = 0
    for by_annotator in verdicts(preferences).values():
        values = list(by_annotator.values())
        if len(values) < 2:
            continue
        items += 1
        labels += len(values)
        for i, mine in enumerate(values):
            for j, theirs in enumerate(values):
                if i != j:
                    coincidence[mine, theirs] += 1.0 / (len(values) - 1)
                    agree += mine == theirs
                    total += 1
    if not items:
        return {"items": 0, "labels": 0, "percent": None, "alpha": None}
    marginal: dict[str, float] = defaultdict(float)
    for (mine, _), count in coincidence.items():
        marginal[mine] += count
    n = sum(marginal.values())
    observed = sum(c for (mine, theirs), c in coincidence.items() if mine != theirs)
    expected = sum(marginal[c] * marginal[k] for c in marginal for k in marginal if c != k)
    alpha = None if expected == 0 else round(1.0 - (n - 1) * observed / expected, 4)
    return {"items": items, "labels": labels, "percent": round(agree / total, 4), "alpha": alpha}


def gold_accuracy(preferences: Iterable[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per annotator, the share of their verdicts on gold comparisons (those with a record of an
    annotation Label Studio marks ``ground_truth``) that match the gold verdict, and how many.
    The gold annotation itself is not scored; comparisons with conflicting gold are skipped."""
    records = list(preferences)
    gold = verdicts(r for r in records if r.get("ground_truth"))
    scored = verdicts(r for r in records if not r.get("ground_truth"))
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, answers in gold.items():
        if len(set(answers.values())) != 1:
            continue
        answer = next(iter(answers.values()))
        for annotator, verdict in scored.get(item, {}).items():
            hits[annotator].append(verdict == answer)
    return {a: (round(sum(v) / len(v), 4), len(v)) for a, v in hits.items()}


def with_reward_model_rates(
    rows: list[dict[str, Any]], rates: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    empty = {"rm_win_rate": None, "rm_comparisons": 0}
    return [{**row, **rates.get(row["policy"], empty)} for row in rows]


def label_counts(
    preferences: list[dict[str, Any]], unpaired: list[dict[str, Any]]
) -> dict[str, int]:
    """What the project's labels say, by kind: decisive and graded pairs, ties, "both bad"
    answers (kept out of the pair loss, used as undesirable examples) and single verdicts."""
    verdicts = [r for r in unpaired if r.get("source") != "both_bad"]
    return {
        "pairs": sum(not p.get("tie") for p in preferences),
        "graded_pairs": sum("strength" in p for p in preferences),
        "ties": sum(bool(p.get("tie")) for p in preferences),
        "both_bad": len({r["annotation"] for r in unpaired if r.get("source") == "both_bad"}),
        "desirable": sum(bool(r["desirable"]) for r in verdicts),
        "undesirable": sum(not r["desirable"] for r in verdicts),
    }
