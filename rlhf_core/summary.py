"""A project at a glance: model versions, jobs, annotators and the policy leaderboard.

The one source of the dashboard's figures and of ``GET /api/projects/<id>/summary``. Everything
is read from the store and the registry; nothing here loads a model.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
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
    annotators on the pairs both judged, and the served reward model's held-out agreement."""
    pairs: dict[str, int] = defaultdict(int)
    for record in preferences:
        pairs[str(record.get("annotator"))] += 1
    agreement = inter_annotator_agreement(preferences)
    with_model = (reward_model.metrics.get("heldout") or {}).get("per_annotator") or {}
    rows = []
    for annotator, (labels, skipped) in sorted(
        store.annotator_counts(reward_model.project_id).items(), key=lambda item: str(item[0])
    ):
        key = str(annotator)
        agreed, shared = agreement.get(key, (None, 0))
        rows.append(
            {
                "annotator": annotator,
                "labels": labels,
                "skipped": skipped,
                "pairs": pairs.get(key, 0),
                "agreement": agreed,
                "agreement_n": shared,
                "model_agreement": with_model.get(key),
            }
        )
    return rows


def inter_annotator_agreement(
    preferences: Iterable[dict[str, Any]],
) -> dict[str, tuple[float, int]]:
    """Per annotator, the share of their verdicts that another annotator gave too on the same
    pair of responses of the same task (a tie is its own verdict), and how many such overlaps."""
    verdicts: dict[tuple[Any, frozenset[str]], dict[str, str]] = defaultdict(dict)
    for record in preferences:
        chosen, rejected = str(record.get("chosen")), str(record.get("rejected"))
        item = (record.get("task"), frozenset((chosen, rejected)))
        verdicts[item][str(record.get("annotator"))] = "\0tie" if record.get("tie") else chosen
    agreed: dict[str, list[bool]] = defaultdict(list)
    for by_annotator in verdicts.values():
        for annotator, verdict in by_annotator.items():
            for other, theirs in by_annotator.items():
                if other != annotator:
                    agreed[annotator].append(verdict == theirs)
    return {a: (round(sum(v) / len(v), 4), len(v)) for a, v in agreed.items()}


def with_reward_model_rates(
    rows: list[dict[str, Any]], rates: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    empty = {"rm_win_rate": None, "rm_comparisons": 0}
    return [{**row, **rates.get(row["policy"], empty)} for row in rows]
