"""Annotation intake: validate a Label Studio webhook, store it durably, then answer.

The request path never trains: at most it queues a training job (a row in the store) for the
trainer worker. An annotation event is one read (the project) and one write transaction (the
annotation, its records and the training trigger, committed together before the answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeGuard

from rlhf_core.config import BackendConfig
from rlhf_core.conversion import Provenance, convert
from rlhf_core.errors import (
    AnnotationMismatch,
    BadRequest,
    LabelConfigTooLarge,
    NotFound,
    UnsupportedLabelConfig,
)
from rlhf_core.label_schema import check_label_config, parse_label_config
from rlhf_core.store import IncomingAnnotation, Store

logger = logging.getLogger(__name__)

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
ANNOTATION_DELETED = "ANNOTATION_DELETED"
START_TRAINING = "START_TRAINING"
PROJECT_UPDATED = "PROJECT_UPDATED"

MAX_ID = 2**63 - 1  # ids are SQLite INTEGERs (signed 64-bit)
DEFAULT_MAX_LABEL_CONFIG_BYTES = BackendConfig.max_label_config_bytes


@dataclass(frozen=True)
class IntakeResult:
    action: str
    status: str  # stored | stale | deleted | queued | coalesced | updated | ignored
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "status": self.status, **self.detail}


def handle_event(
    store: Store,
    payload: Any,
    train_every: int,
    proven: bool,
    max_label_config_bytes: int = DEFAULT_MAX_LABEL_CONFIG_BYTES,
) -> IntakeResult:
    """Apply one webhook event to the store. Raises BadRequest/NotFound for unusable input.

    ``proven``: the event carried its project's webhook secret (``ml_backend.trust``). An
    unproven START_TRAINING (Label Studio's ML client cannot send the secret) only queues
    training for a connected project; it never registers a project or changes its config.

    A label config the event carries replaces the project's only when ``/setup`` would accept
    it; otherwise the working one stays (the answer says so), and a project not known yet is
    refused with the config's 413/422, storing nothing.
    """
    if not isinstance(payload, dict):
        raise BadRequest("webhook body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("webhook body needs an 'action' string, e.g. 'ANNOTATION_CREATED'")
    if action in (ANNOTATION_CREATED, ANNOTATION_UPDATED):
        return _store_annotation(store, action, payload, train_every, max_label_config_bytes)
    if action in (ANNOTATIONS_DELETED, ANNOTATION_DELETED):
        return _delete_annotations(store, action, payload)
    if action == START_TRAINING:
        if proven:
            project_id, _, kept = _known_project(store, payload, max_label_config_bytes)
        else:
            project_id, kept = _connected_project(store, payload), {}
        job = store.enqueue_training(project_id, trigger="start_training")
        status = "queued" if job else "coalesced"
        return IntakeResult(action, status, {"job_id": job.job_id if job else None, **kept})
    if action == PROJECT_UPDATED:
        project_id, _, kept = _known_project(store, payload, max_label_config_bytes)
        return IntakeResult(action, "updated", {"project": project_id, **kept})
    logger.info("ignoring webhook action %r", action[:64])
    return IntakeResult(action, "ignored", {})


def project_payload(payload: dict[str, Any]) -> dict[str, Any]:
    project = payload.get("project")
    if isinstance(project, int) and not isinstance(project, bool):
        project = {"id": project}
    if not isinstance(project, dict):
        raise BadRequest("webhook body needs a 'project' object with an integer 'id'")
    _require_int(project, "id", "project")
    return project


def _connected_project(store: Store, payload: dict[str, Any]) -> int:
    project_id = project_payload(payload)["id"]
    if store.project(project_id) is None:
        raise NotFound(f"project {project_id} is not connected to this backend")
    return project_id


def _known_project(
    store: Store, payload: dict[str, Any], max_label_config_bytes: int
) -> tuple[int, str, dict[str, str]]:
    """The event's project id, the label config in force, and what became of a label config
    the event carries: it replaces the stored one if ``/setup`` would accept it, else the
    stored one is kept (the third value then says why for the answer)."""
    project = project_payload(payload)
    project_id = project["id"]
    label_config = project.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest("project.label_config must be a string")
    stored = store.project(project_id)
    if label_config and (stored is None or stored.label_config != label_config):
        try:
            check_label_config(label_config, max_label_config_bytes)
        except (UnsupportedLabelConfig, LabelConfigTooLarge) as exc:
            if stored is None:
                raise
            logger.warning("project %s: kept the working label config: %s", project_id, exc)
            kept = {"label_config": f"refused, the working one kept: {exc.message}"}
            return project_id, stored.label_config, kept
        store.upsert_project(project_id, label_config)
        return project_id, label_config, {}
    if stored is None:
        raise NotFound(
            f"project {project_id} is unknown: connect this backend to it in Label Studio "
            "(POST /setup) or send the project's label_config with the event"
        )
    return project_id, stored.label_config, {}


def _store_annotation(
    store: Store,
    action: str,
    payload: dict[str, Any],
    train_every: int,
    max_label_config_bytes: int,
) -> IntakeResult:
    annotation = payload.get("annotation")
    if not isinstance(annotation, dict):
        raise BadRequest(f"{action} needs an 'annotation' object")
    annotation_id = _require_int(annotation, "id", "annotation")
    result = annotation.get("result")
    if result is None:
        result = []
    if not isinstance(result, list):
        raise BadRequest("annotation.result must be a list")
    was_cancelled = annotation.get("was_cancelled")
    if was_cancelled is not None and not isinstance(was_cancelled, bool):
        raise BadRequest("annotation.was_cancelled must be true or false")
    ls_updated_at = ls_timestamp(annotation)
    task = payload.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise BadRequest(f"{action} needs a 'task' object with a 'data' object")
    project_id, label_config, kept = _known_project(store, payload, max_label_config_bytes)
    incoming = IncomingAnnotation(
        annotation_id=annotation_id,
        project_id=project_id,
        task_id=_optional_int(task.get("id")),
        annotator=_optional_int(annotation.get("completed_by")),
        task_data=task["data"],
        result=result,
        was_cancelled=bool(was_cancelled),
        ls_updated_at=ls_updated_at,
        label_config=label_config,
    )
    gold = annotation.get("ground_truth") is True
    records = [] if incoming.was_cancelled else _records(incoming, gold)
    # One write transaction: the annotation, its records and the training trigger commit
    # together (or not at all), after the validation and conversion above.
    written = store.store_annotation(incoming, records, train_every)
    if not written.stored:
        logger.info("annotation %s: stale or deleted, kept the stored state", annotation_id)
        return IntakeResult(action, "stale", {"annotation": annotation_id, **kept})
    detail: dict[str, Any] = {"annotation": annotation_id, "records": len(records), **kept}
    if written.job is not None:
        detail["job_id"] = written.job.job_id
    return IntakeResult(action, "stored", detail)


def _records(
    annotation: IncomingAnnotation, ground_truth: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """Training records, or none when the annotation does not fit the config (it is still kept).
    ``ground_truth``: Label Studio marks the annotation as gold (its records then say so)."""
    try:
        schema = parse_label_config(annotation.label_config)
        provenance = Provenance(
            annotation.project_id,
            annotation.task_id,
            annotation.annotation_id,
            annotation.annotator,
            ground_truth,
        )
        return convert(annotation.result, annotation.task_data, schema, provenance)
    except (UnsupportedLabelConfig, AnnotationMismatch) as exc:
        logger.warning(
            "annotation %s stored without training records: %s", annotation.annotation_id, exc
        )
        return []


def _delete_annotations(store: Store, action: str, payload: dict[str, Any]) -> IntakeResult:
    listed = payload.get("annotations")
    if listed is None and isinstance(payload.get("annotation"), dict):
        listed = [payload["annotation"]]
    if not isinstance(listed, list) or not all(isinstance(a, dict) for a in listed):
        raise BadRequest(f"{action} needs an 'annotations' list of objects with an 'id'")
    ids = [_require_int(a, "id", "annotations[]") for a in listed]
    project_id = project_payload(payload)["id"]
    store.delete_annotations(project_id, ids)
    return IntakeResult(action, "deleted", {"annotations": ids})


def ls_timestamp(annotation: dict[str, Any]) -> str:
    """The annotation's Label Studio ``updated_at`` (else ``created_at``), as comparable text.

    Label Studio leaves out zero microseconds and may use a UTC offset other than ``Z``, so the
    raw strings do not sort in time order; every timestamp is stored as UTC with microseconds
    (``2026-11-23T10:43:12.926390Z``, naive ones read as UTC). ``""`` (older than any) when
    neither is sent.
    """
    raw = annotation.get("updated_at") or annotation.get("created_at")
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str):
        raise BadRequest("annotation.updated_at must be an ISO 8601 timestamp string")
    try:
        moment = datetime.fromisoformat(
            raw.removesuffix("Z") + ("+00:00" if raw[-1:] == "Z" else "")
        )
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise BadRequest(
            f"annotation.updated_at must be an ISO 8601 timestamp, got {raw[:40]!r}"
        ) from None
    return moment.isoformat(timespec="microseconds") + "Z"


def _is_id(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _require_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not _is_id(value):
        raise BadRequest(f"{where}.{key} must be an integer id between 0 and 2**63-1")
    return value


def _optional_int(value: Any) -> int | None:
    return value if _is_id(value) else None
