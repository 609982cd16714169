"""Backfill from a real Label Studio: tasks annotated while no backend was listening reach the
store through ``rlhf-backend reconcile`` (idempotently) and train the next version.

The backend is connected once (so it knows the project), with no worker to run the reconcile
job /setup queues, then stopped; annotations are made, edited and deleted while it is down;
the command line reconciles against the stopped service's data directory, then trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk.client import LabelStudio

from .harness import (
    SESSION_SETUP_BUDGET_S,
    LabelStudioServer,
    _clean_env,
    connect,
    create_project,
    start_backend,
    wait_for,
)
from .test_label_studio import pairwise
from .test_training_round import TASKS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 900)]


def cli(data_dir: Path, label_studio: LabelStudioServer, *args: str) -> dict[str, Any]:
    """``rlhf-backend ARGS --data-dir DATA_DIR``; its last stdout line, parsed."""
    script = Path(sys.executable).parent / "rlhf-backend"
    env = _clean_env(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        RLHF_POLICY_TRAINING="off",
    )
    done = subprocess.run(
        [str(script), *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if args[0] == "reconcile":
        return json.loads(done.stdout.strip().splitlines()[-1])
    return json.loads(done.stdout)


def annotate(ls: LabelStudio, project: Any, task_id: int) -> int:
    helpful_left = "explained clearly" in project.task_data[task_id]["answer1"]
    created = ls.annotations.create(
        id=task_id, result=pairwise("left" if helpful_left else "right")
    )
    assert created.id is not None
    return created.id


def test_annotations_made_while_the_backend_was_down_are_reconciled_and_trained_on(
    label_studio: LabelStudioServer, ls: LabelStudio, tmp_path: Path
) -> None:
    project = create_project(ls, "reconcile while down", TASKS)
    before = [annotate(ls, project, t) for t in project.task_ids[:3]]  # not yet connected
    data_dir = tmp_path / "data"
    backend = start_backend(data_dir, RLHF_EMBEDDED_WORKER="0", RLHF_TRAIN_EVERY="0")
    try:
        connect(label_studio, project.id, backend)
        wait_for(lambda: backend.store.project(project.id), 60, "the backend's /setup")
    finally:
        backend.process.stop()
    during = [annotate(ls, project, t) for t in project.task_ids[3:8]]  # backend down
    assert backend.store.annotations(project.id) == []

    assert cli(data_dir, label_studio, "reconcile", "--project", str(project.id)) == {
        "added": 8,
        "updated": 0,
        "removed": 0,
    }
    stored = {a.annotation_id for a in backend.store.annotations(project.id)}
    assert stored == set(before + during)
    assert cli(data_dir, label_studio, "reconcile", "--project", str(project.id)) == {
        "added": 0,
        "updated": 0,
        "removed": 0,
    }

    # Edited and deleted in Label Studio while the backend is still down.
    edited_task = project.task_ids[0]
    flipped = pairwise(
        "right" if "explained clearly" in project.task_data[edited_task]["answer1"] else "left"
    )
    ls.annotations.update(id=before[0], result=flipped)
    ls.annotations.delete(id=during[-1])
    assert cli(data_dir, label_studio, "reconcile", "--project", str(project.id)) == {
        "added": 0,
        "updated": 1,
        "removed": 1,
    }
    [edited] = [a for a in backend.store.annotations(project.id) if a.annotation_id == before[0]]
    assert edited.result[0]["value"] == flipped[0]["value"]

    trained = cli(data_dir, label_studio, "train", "--project", str(project.id))
    assert trained["status"] == "done", trained
    snapshot = trained["result"]
    assert (
        snapshot["trained"]
        and snapshot["metrics"]["train_pairs"] + snapshot["metrics"]["heldout_pairs"] == 7
    )
