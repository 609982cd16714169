"""Label Studio follows promotions: the outbox of syncs, drained until Label Studio confirms.

:meth:`rlhf_core.registry.Registry.promote` writes a pending sync in the same transaction that
makes a version served. Draining one means: re-score the project's unlabeled tasks with the
served version (predictions, the pre-annotation job's work) and set the project's
``model_version``, then read the project back from Label Studio; only when it shows the served
version is the sync done. A failure (Label Studio down, a crash, a refused token) leaves the row
pending with its error, and a worker tries again later with growing delays.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_core.arena import Arena
from rlhf_core.config import BackendConfig
from rlhf_core.db import database_for
from rlhf_core.label_schema import parse_label_config
from rlhf_core.label_studio import LabelStudioTasks, client
from rlhf_core.predict import labels_by_task
from rlhf_core.registry import POLICY, REWARD_MODEL, Registry, Sync
from rlhf_core.serving import ModelServer
from rlhf_core.store import Store

logger = logging.getLogger(__name__)


def project_tasks(config: BackendConfig, store: Store, project_id: int) -> LabelStudioTasks:
    """The project's Label Studio, reached only as :mod:`rlhf_core.credentials` allows: the host its
    token came with in /setup, or ``LABEL_STUDIO_URL``."""
    from rlhf_core.credentials import Credentials
    from rlhf_core.vault import Vault

    project = store.project(project_id)
    if project is None:
        raise LookupError(f"project {project_id} is not connected")
    connection = Credentials(config, store, Vault.for_config(config)).connection(project)
    if connection is None:
        raise LookupError(
            "no Label Studio URL/token for this project: reconnect the model in Label Studio "
            "(its /setup brings both), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    return LabelStudioTasks(client(connection))


def preannotate(
    config: BackendConfig,
    store: Store,
    registry: Registry,
    project_id: int,
    tasks: LabelStudioTasks | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Candidates and predictions of the served version for the project's unlabeled tasks,
    and its ``model_version`` in Label Studio (the pre-annotation job, and each sync)."""
    from rlhf_core.preannotate import RecordingTasks, preannotate_project

    project = store.project(project_id)
    if project is None:
        raise LookupError(f"project {project_id} is not connected")
    tasks = tasks or project_tasks(config, store, project_id)
    models = ModelServer(config, registry)
    version = models.served_version(project_id)
    report = preannotate_project(
        project_id,
        parse_label_config(project.label_config),
        models,
        RecordingTasks(tasks, store.note_task_models, project_id, version),
        num_candidates=config.num_candidates,
        strategy=config.strategy,
        progress=progress,
        arena=_arena(config, store, models, project_id),
        labelled=labelled_tasks(config, store, project_id, version),
        contradiction=config.relook_contradiction,
        preselect=bool(config.preselect),
    )
    return report.as_dict()


def labelled_tasks(
    config: BackendConfig, store: Store, project_id: int, version: str
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The project's labelled tasks (``id``, ``data``) with their preference records, leaving
    out those ``version`` already scored (a rerun at the same version uploads nothing twice)."""
    scored = {task for task, (_, by) in store.task_models(project_id).items() if by == version}
    data = {a.task_id: a.task_data for a in store.annotations(project_id) if a.task_id}
    by_task = labels_by_task(store, project_id, config.max_ranking_pairs)
    return [
        ({"id": task, "data": data[task]}, by_task[task])
        for task in sorted(data)
        if task in by_task and task not in scored
    ]


def _arena(config: BackendConfig, store: Store, models: ModelServer, project_id: int) -> Arena:
    registry = models.registry
    return Arena(
        project_id=project_id,
        share=config.arena_share,
        current=registry.served(project_id, POLICY).version,
        opponents=models.arena_opponents(project_id),
        reward_model=registry.served(project_id, REWARD_MODEL).version,
        generate_with=lambda version, prompts, n: models.generate_with(
            project_id, version, prompts, n
        ),
        record=store.replace_arena_responses,
    )


def after_promotion(config: BackendConfig, registry: Registry, project_id: int) -> None:
    """Label Studio follows the served version (a promotion, or a pin): its sync is queued
    unless one is pending, and tried now; a worker retries a failure."""
    served = registry.served_version(project_id)
    if all(s.model_version != served for s in registry.pending_syncs(project_id)):
        registry.queue_sync(project_id)
    drain_syncs(config, registry, project_id)


def drain_syncs(
    config: BackendConfig, registry: Registry, project_id: int | None = None
) -> list[dict[str, Any]]:
    """Try every due pending sync once; returns what happened to each."""
    outcomes = []
    for sync in registry.pending_syncs(project_id, due=True):
        outcomes.append(sync_once(config, registry, sync))
    return outcomes


def sync_once(config: BackendConfig, registry: Registry, sync: Sync) -> dict[str, Any]:
    store = Store(database_for(config))
    served = registry.served_version(sync.project_id)
    try:
        tasks = project_tasks(config, store, sync.project_id)
        report = preannotate(config, store, registry, sync.project_id, tasks)
        shown = tasks.project_model_version(sync.project_id)
        if shown != served:
            raise RuntimeError(f"Label Studio shows model_version {shown!r}, not {served!r}")
    except Exception as exc:  # retried later: Label Studio may be down or the token refused
        error = f"{type(exc).__name__}: {exc}"[:500]
        registry.sync_failed(sync.sync_id, error)
        logger.warning("project %s: sync of %s failed (%s)", sync.project_id, served, error)
        return {"sync": sync.sync_id, "model_version": served, "done": False, "error": error}
    registry.sync_confirmed(sync.sync_id)
    store.set_project_model_version(sync.project_id, served)
    logger.info("project %s: Label Studio shows %s", sync.project_id, served)
    return {"sync": sync.sync_id, "model_version": served, "done": True, **report}
