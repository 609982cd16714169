"""A full training round in a real Label Studio: annotate, retrain, promote, re-score.

A scripted annotator labels tasks through Label Studio's API; the backend (embedded worker,
default models: all-MiniLM-L6-v2 reward model, tiny policy with DPO) retrains after every 4
annotations and on Start Training; the promoted version becomes the project's model version in
Label Studio and the unlabeled tasks get fresh predictions that carry it, lowest score first.
"""

from __future__ import annotations

from typing import Any

import pytest
from label_studio_sdk.client import LabelStudio

from rlhf_cli.main import main
from rlhf_core.config import BackendConfig
from rlhf_core.registry import PROMOTED, REWARD_MODEL
from trainer.jobs import registry_for

from .harness import SESSION_SETUP_BUDGET_S, Backend, LabelStudioServer, connect, create_project
from .harness import wait_for as _wait_for
from .test_label_studio import pairwise

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 1200)]

TRAINING_TIMEOUT_S = 900.0  # embedding, head training, DPO on the tiny policy, re-scoring
TOPICS = ["bread", "tea", "rain", "chess", "maps", "glue", "owls", "jazz", "soap", "kites"]


def task(i: int, topic: str) -> dict[str, str]:
    """The scripted annotator prefers the helpful answer; which side it is on alternates."""
    helpful = f"Here is a fact about {topic}, explained clearly."
    rude = f"No. Look up {topic} yourself."
    left, right = (helpful, rude) if i % 2 else (rude, helpful)
    return {"prompt": f"Tell me one fact about {topic}.", "answer1": left, "answer2": right}


TASKS = [task(i, topic) for i, topic in enumerate(TOPICS)]


def wait_for(probe: Any, what: str) -> Any:
    return _wait_for(probe, timeout_s=TRAINING_TIMEOUT_S, what=what, interval_s=1.0)


def served_version(backend: Backend, project_id: int) -> str:
    data_dir = backend.store.path.parent
    return registry_for(BackendConfig(data_dir=data_dir)).served_version(project_id)


def test_annotations_retrain_promote_and_label_studio_follows(
    label_studio: LabelStudioServer, training_backend: Backend, ls: LabelStudio
) -> None:
    backend = training_backend
    project = create_project(ls, "training round", TASKS)
    connect(label_studio, project.id, backend)
    labeled, unlabeled = project.task_ids[:6], project.task_ids[6:]
    for task_id in labeled[:4]:  # the 4th usable annotation queues a training job by itself
        helpful_left = "explained clearly" in project.task_data[task_id]["answer1"]
        ls.annotations.create(id=task_id, result=pairwise("left" if helpful_left else "right"))
    first = wait_for(
        lambda: [j for j in backend.store.jobs(project.id) if j.kind == "train"],
        "a training job queued by 4 annotations",
    )  # /setup queued a reconcile job before them (the project had no annotations yet)
    assert first[0].trigger == "annotations"

    wait_for(
        lambda: any(
            j.kind == "train" and j.status == "done" for j in backend.store.jobs(project.id)
        ),
        "the training job to finish",
    )
    registry = registry_for(BackendConfig(data_dir=backend.store.path.parent))
    rm = registry.served(project.id, REWARD_MODEL)
    assert (rm.version, rm.status) == ("rm-0001", PROMOTED), rm
    assert rm.metrics["train_pairs"] + rm.metrics["heldout_pairs"] == 4
    version = served_version(backend, project.id)
    assert version.startswith("rm-0001.policy-")

    # Promotion re-scores the pool: Label Studio's project follows, and the unlabeled tasks get
    # predictions of the new version.
    wait_for(
        lambda: ls.projects.get(id=project.id).model_version == version,
        f"Label Studio's project model_version to become {version}",
    )
    fresh = {
        p.task: p for p in ls.predictions.list(project=project.id) if p.model_version == version
    }
    assert set(unlabeled) <= set(fresh), (sorted(fresh), unlabeled)
    for task_id in unlabeled:
        assert 0.0 <= fresh[task_id].score <= 1.0
        assert fresh[task_id].result == []  # no anchoring by default (RLHF_PRESELECT=0)

    # More labels, then Start Training from Label Studio: a second version is trained.
    for task_id in labeled[4:]:
        ls.annotations.create(id=task_id, result=pairwise("left"))
    ml = ls.ml.list(project=project.id)[0]
    assert label_studio.api("POST", f"/api/ml/{ml.id}/train").status_code == 200
    wait_for(
        lambda: registry.get(project.id, REWARD_MODEL, "rm-0002") is not None,
        "a second reward-model version",
    )
    second = registry.get(project.id, REWARD_MODEL, "rm-0002")
    assert second.data_snapshot["records"] == 6 and second.reason
    assert any(j.trigger == "start_training" for j in backend.store.jobs(project.id))

    # The lead pins the other reward model (serve-version): Label Studio follows through the
    # promotion path, project model_version and fresh predictions; --unpin returns.
    wait_for(
        lambda: all(
            j.status == "done" for j in backend.store.jobs(project.id) if j.kind == "train"
        ),
        "the second training job to finish",
    )
    before = served_version(backend, project.id)
    other = "rm-0001" if before.startswith("rm-0002.") else "rm-0002"
    data_dir = str(backend.store.path.parent)
    pin = ["serve-version", "--project", str(project.id), "--data-dir", data_dir]

    def label_studio_follows(version: str) -> None:
        wait_for(
            lambda: ls.projects.get(id=project.id).model_version == version,
            f"Label Studio's project model_version to become {version}",
        )
        wait_for(
            lambda: (
                set(unlabeled)
                <= {
                    p.task
                    for p in ls.predictions.list(project=project.id)
                    if p.model_version == version
                }
            ),
            f"predictions of {version} on every unlabeled task",
        )

    assert main([*pin, "--version", other, "--reason", "e2e rollback"]) == 0
    pinned = served_version(backend, project.id)
    assert pinned == f"{other}.{before.split('.', 1)[1]}"
    label_studio_follows(pinned)
    assert main([*pin, "--unpin"]) == 0
    assert served_version(backend, project.id) == before
    label_studio_follows(before)
