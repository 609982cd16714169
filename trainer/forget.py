"""Forget a task everywhere the backend keeps it (a data-protection request).

The store holds the task's text in its annotations (task data and result) and in the training
records derived from them; :meth:`rlhf_core.store.Store.forget_task` erases both, with SQLite
overwriting the freed pages. What the backend cannot erase by itself is reported instead:

* exported files (``rlhf-backend export``) that still contain the task: delete or re-export them;
* model versions whose training data included it: their weights may still reflect it; the
  next training no longer sees it;
* Label Studio itself, which holds the task: delete it there too, or new annotations of it will
  arrive again through the webhook.

The embedding cache (:mod:`rlhf_core.embedding_store`) drops every vector of the task's prompt
and responses, read from its records before they are erased.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from rlhf_core.config import BackendConfig
from rlhf_core.registry import Registry
from rlhf_core.serving import embedding_store_path
from rlhf_core.store import Store
from trainer.export import HF_DIR, exports_logs

logger = logging.getLogger(__name__)


def forget_task(
    config: BackendConfig, store: Store, registry: Registry, project_id: int, task_id: int
) -> dict[str, Any]:
    texts = store.task_texts(project_id, task_id)  # read before they are erased
    annotations = store.forget_task(project_id, task_id)
    embeddings = forget_embeddings(embedding_store_path(config), texts)
    logger.info(
        "project %s: forgot task %s (%d annotations)", project_id, task_id, len(annotations)
    )
    trained_on = sorted(
        v.version
        for v in registry.versions(project_id)
        if set(v.data_snapshot.get("annotations") or []) & set(annotations)
    )
    return {
        "project": project_id,
        "task": task_id,
        "annotations": annotations,
        "texts_erased": len(texts),
        "embeddings_dropped": embeddings,
        "exported_files_still_holding_it": exported_files_with_task(
            config, registry, project_id, task_id
        ),
        "versions_trained_on_it": trained_on,
        "label_studio": "the task itself is still in Label Studio: delete it there too",
    }


def forget_embeddings(path: Path, texts: set[str]) -> int:
    """Drop the cached embeddings of ``texts``; the cache file's WAL is emptied after."""
    if not path.exists() or not texts:
        return 0
    from rlhf_core.embedding_store import EmbeddingStore

    cache = EmbeddingStore(path)
    try:
        dropped = cache.forget(texts)
    finally:
        cache.close()
    with contextlib.closing(sqlite3.connect(path, timeout=30.0)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return dropped


def exported_files_with_task(
    config: BackendConfig, registry: Registry, project_id: int, task_id: int
) -> list[str]:
    """Files of earlier exports that exist and still contain a row of ``task_id``."""
    files: dict[str, list[int]] = {}  # path -> tasks the export put there (the latest wins)
    for log in exports_logs(config, registry, project_id):  # the older log first
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            for name in entry["files"]:
                files[name] = entry["tasks"]
    holding = []
    for name, tasks in sorted(files.items()):
        path = Path(name)
        if path.name == HF_DIR and path.is_dir():
            if task_id in tasks:  # arrow files: trust the log rather than parse them
                holding.append(name)
        elif path.suffix == ".jsonl" and path.is_file() and _jsonl_has_task(path, task_id):
            holding.append(name)
    return holding


def _jsonl_has_task(path: Path, task_id: int) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(json.loads(line).get("task") == task_id for line in f if line.strip())
