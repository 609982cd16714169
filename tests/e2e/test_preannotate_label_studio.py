"""Pre-annotation against a real Label Studio: candidates written into tasks, predictions in.

Runs ``rlhf-backend preannotate --project ID`` as a user would, on the data dir of a backend
that Label Studio connected to (so it knows the project's Label Studio URL and token).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from label_studio_sdk.client import LabelStudio

from .harness import SESSION_SETUP_BUDGET_S, Backend, LabelStudioServer, connect, pairwise_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 600)]

TASKS = [
    {
        "prompt": "How do I keep basil alive?",
        "answer1": "Water it daily and give it sun.",
        "answer2": "Basil cannot be kept alive.",
    },
    {"prompt": "What is 2 + 2?", "answer1": "4", "answer2": "22"},
    {"prompt": "Suggest a name for a cat.", "answer1": "", "answer2": ""},
    {"prompt": "How do I boil an egg?", "answer1": "", "answer2": ""},
]


def test_preannotate_fills_prompt_only_tasks_and_uploads_predictions(
    label_studio: LabelStudioServer, ls: LabelStudio, backend: Backend
):
    project = ls.projects.create(title="preannotate", label_config=pairwise_config())
    ls.projects.import_tasks(id=project.id, request=TASKS)
    connect(label_studio, project.id, backend)
    data_dir = Path(backend.store.path).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LABEL_STUDIO_URL": label_studio.url}
    script = Path(sys.executable).parent / "rlhf-backend"
    run = subprocess.run(
        [str(script), "preannotate", "--project", str(project.id), "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    tasks = {t.id: t for t in ls.tasks.list(project=project.id, fields="all")}
    assert len(tasks) == 4
    for task in tasks.values():
        assert task.data["answer1"].strip() and task.data["answer2"].strip(), task.data
        assert task.data["answer1"] != task.data["answer2"]
        versions = [p.model_version for p in ls.predictions.list(task=task.id)]
        assert versions == ["rm-untrained.policy-base"], versions
    given = {t.data["prompt"]: t.data for t in tasks.values()}
    assert given["What is 2 + 2?"]["answer1"] == "4"  # tasks with responses keep them
    assert ls.projects.get(id=project.id).model_version == "rm-untrained.policy-base"

    # a rerun at the same version has nothing left to do
    again = subprocess.run(
        [str(script), "preannotate", "--project", str(project.id), "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"tasks_seen": 0' in again.stdout
    assert all(len(ls.predictions.list(task=t)) == 1 for t in tasks)
