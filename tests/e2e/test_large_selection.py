"""*Retrieve Predictions* on a selection larger than one /predict can score in Label Studio's time.

Label Studio sends the whole selection in one /predict and waits ``ML_TIMEOUT_PREDICT`` (100 s by
default) for the answer; a late answer is dropped whole. The backend scores tasks until
``RLHF_PREDICT_TIME_BUDGET_S`` runs out, answers (the tasks it had no time for with no
prediction), and queues a pre-annotation job that uploads the rest through Label Studio's API.

The backend runs without its embedded worker, so what Label Studio holds right after the action
is exactly what the /predict answer carried; then ``rlhf-backend worker --once`` runs the queued
job and every task ends with exactly one prediction.

* ``test_retrieve_predictions_hands_the_rest_to_preannotation`` (CI): 40 short tasks, a budget
  no chunk fits in, on the session's Label Studio.
* ``test_retrieve_predictions_on_2000_long_tasks_within_label_studios_timeout`` (also ``slow``:
  minutes on 2 cores): 2,000 tasks with two ~4 KB responses, default budget, a Label Studio of
  its own with its default 100 s timeout: had the answer come later, Label Studio would have
  stored no prediction from it. The hand-off job is queued, not run (uploading ~2,000
  predictions is what the CI variant checks on 8).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk.client import LabelStudio

from .harness import (
    E2E_CACHE,
    SESSION_SETUP_BUDGET_S,
    Backend,
    LabelStudioServer,
    connect,
    create_project,
    label_studio_binary,
    migrated_database,
    start_backend,
    start_label_studio,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 1800)]

LABEL_STUDIO_DEFAULT_PREDICT_TIMEOUT_S = 100
IMPORT_BATCH = 250


def long_text(seed: int, chars: int) -> str:
    words = [f"w{(seed * 7919 + k * 104729) % 5000}" for k in range(chars // 5 + 1)]
    return " ".join(words)[:chars]


def pairwise_tasks(n: int, chars: int) -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"Question {k}: " + long_text(k, 200),
            "answer1": long_text(k + 1, chars),
            "answer2": long_text(k + 2, chars),
        }
        for k in range(n)
    ]


def predictions_by_task(ls: LabelStudio, project_id: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for prediction in ls.predictions.list(project=project_id):
        counts[prediction.task] = counts.get(prediction.task, 0) + 1
    return counts


def retrieve_predictions_then_run_the_job(
    label_studio: LabelStudioServer, backend: Backend, n: int, chars: int, run_job: bool = True
) -> dict[str, Any]:
    ls = label_studio.client()
    tasks = pairwise_tasks(n, chars)
    project = create_project(ls, f"large selection {n}", tasks[:IMPORT_BATCH])
    for start in range(IMPORT_BATCH, n, IMPORT_BATCH):
        ls.projects.import_tasks(id=project.id, request=tasks[start : start + IMPORT_BATCH])
    connect(label_studio, project.id, backend)

    started = time.monotonic()
    action = label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project.id},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    answered_s = time.monotonic() - started
    assert action.status_code == 200, action.text
    from_predict = predictions_by_task(ls, project.id)
    [job] = [j for j in backend.store.jobs(project.id) if j.kind == "preannotate"]
    assert job.trigger == f"/predict hand-off: {n - len(from_predict)} tasks"
    assert 0 < len(from_predict) < n  # the answer carried some; the job has the rest
    print(
        f"\n{n} tasks: Retrieve Predictions answered in {answered_s:.1f} s with "
        f"{len(from_predict)} predictions; {n - len(from_predict)} handed off"
    )
    if not run_job:
        return {"answered_s": answered_s, "predicted": len(from_predict)}

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["LABEL_STUDIO_URL"] = label_studio.url
    worker = Path(sys.executable).parent / "rlhf-backend"
    data_dir = backend.store.path.parent
    subprocess.run(
        [str(worker), "worker", "--once", "--data-dir", str(data_dir)],
        env=env,
        check=True,
        timeout=3600,
    )

    assert backend.store.job(job.job_id).status == "done"
    assert predictions_by_task(ls, project.id) == {t: 1 for t in ls_task_ids(ls, project.id)}
    return {"answered_s": answered_s, "predicted": len(from_predict)}


def ls_task_ids(ls: LabelStudio, project_id: int) -> list[int]:
    return [task.id for task in ls.tasks.list(project=project_id, fields="all")]


@pytest.fixture
def backend_without_worker(
    tmp_path: Path, label_studio: LabelStudioServer, request: pytest.FixtureRequest
) -> Iterator[Backend]:
    budget = getattr(request, "param", "0.000001")
    server = start_backend(
        tmp_path / "data",
        RLHF_EMBEDDED_WORKER="0",
        RLHF_PREDICT_TIME_BUDGET_S=budget,
        LABEL_STUDIO_URL=label_studio.url,
    )
    try:
        yield server
    finally:
        server.process.stop()


def test_retrieve_predictions_hands_the_rest_to_preannotation(
    label_studio: LabelStudioServer, backend_without_worker: Backend
) -> None:
    # A budget no chunk fits in: the first chunk (32 tasks) is answered, 8 are handed off.
    outcome = retrieve_predictions_then_run_the_job(label_studio, backend_without_worker, 40, 200)

    assert outcome["predicted"] == 32


@pytest.fixture
def label_studio_default_timeout(tmp_path: Path) -> Iterator[LabelStudioServer]:
    binary = label_studio_binary()
    if not binary.exists():
        pytest.fail(f"no Label Studio at {binary} (LABEL_STUDIO_BIN)")
    data_dir = tmp_path / "label-studio"
    data_dir.mkdir()
    server = start_label_studio(
        binary,
        data_dir,
        migrated_database(binary, E2E_CACHE),
        predict_timeout_s=LABEL_STUDIO_DEFAULT_PREDICT_TIMEOUT_S,
    )
    try:
        yield server
    finally:
        server.process.stop()


@pytest.mark.slow
def test_retrieve_predictions_on_2000_long_tasks_within_label_studios_timeout(
    tmp_path: Path, label_studio_default_timeout: LabelStudioServer
) -> None:
    backend = start_backend(
        tmp_path / "data",
        RLHF_EMBEDDED_WORKER="0",
        LABEL_STUDIO_URL=label_studio_default_timeout.url,
    )
    try:
        # The job's uploads are what the CI variant checks; here: the answer came in time.
        retrieve_predictions_then_run_the_job(
            label_studio_default_timeout, backend, 2000, 4000, run_job=False
        )
    finally:
        backend.process.stop()
