"""Reconcile: bring the store level with the annotations a project has in Label Studio.

Webhooks are the fast path; this is the one that never misses. It reads every annotation of the
project through Label Studio's API (tasks and annotations, paged), stores through the webhook
intake (:func:`rlhf_core.intake.handle_event`) those the store lacks or holds in an older
state, and tombstones those Label Studio no longer has. Annotations made before the backend was
connected, while it was down, or whose webhook was lost arrive this way. Running it twice in a
row changes nothing the second time.

Example: Label Studio holds annotations 1 (edited since it was stored) and 3 (new); the store
holds 1 and 2 -> ``{"added": 1, "updated": 1, "removed": 1}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf_core.intake import ANNOTATION_UPDATED, handle_event, ls_timestamp
from rlhf_core.store import Store

logger = logging.getLogger(__name__)


class AnnotationSource(Protocol):
    def annotated_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Tasks (``id``, ``data``) with their ``annotations`` as Label Studio's API has them."""


@dataclass
class ReconcileReport:
    added: int = 0
    updated: int = 0
    removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def reconcile_project(
    store: Store, project_id: int, source: AnnotationSource, train_every: int = 0
) -> ReconcileReport:
    """Store what Label Studio has and the store lacks; remove what Label Studio deleted.

    Nothing is removed unless the whole listing was read. With ``train_every``, a training job
    is queued as the webhooks would have queued it.
    """
    if store.project(project_id) is None:
        raise LookupError(f"project {project_id} is not connected")
    stored = {a.annotation_id: a for a in store.annotations(project_id)}
    report = ReconcileReport()
    seen: set[int] = set()
    for task in source.annotated_tasks(project_id):
        for annotation in task["annotations"]:
            seen.add(annotation["id"])
            known = stored.get(annotation["id"])
            if known is not None and _same(known, annotation):
                continue
            event = {
                "action": ANNOTATION_UPDATED,
                "project": {"id": project_id},
                "task": {"id": task["id"], "data": task["data"]},
                "annotation": annotation,
            }
            # Read from Label Studio's API with the project's own token: as proven as it gets.
            if handle_event(store, event, train_every=0, proven=True).status != "stored":
                continue  # tombstoned here: Label Studio deleted it and never reuses ids
            if known is None:
                report.added += 1
            else:
                report.updated += 1
    gone = sorted(set(stored) - seen)
    if gone:
        store.delete_annotations(project_id, gone)
        report.removed = len(gone)
    if train_every and (report.added or report.updated or report.removed):
        store.enqueue_training(project_id, "reconcile", min_new=train_every)
    logger.info("project %s reconciled: %s", project_id, report.as_dict())
    return report


def _same(known: Any, annotation: dict[str, Any]) -> bool:
    return (
        known.ls_updated_at == ls_timestamp(annotation)
        and known.result == (annotation.get("result") or [])
        and known.was_cancelled == bool(annotation.get("was_cancelled"))
    )
