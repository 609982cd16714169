"""The backend against a real Label Studio 1.23.2: connect, annotate, train, basic auth.

Predictions (Retrieve Predictions, Test prediction, pre-annotation) are checked per template in
test_templates_label_studio.py.

Everything goes through Label Studio's own API (label-studio-sdk or plain REST), exactly as a
user's clicks would; the backend's store is then read directly to check what arrived.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from label_studio_sdk.client import LabelStudio

from rlhf_core.config import BackendConfig
from rlhf_core.credentials import WEBHOOK_SECRET_HEADER, Credentials
from rlhf_core.vault import Vault

from .harness import (
    SESSION_SETUP_BUDGET_S,
    Backend,
    LabelStudioServer,
    Project,
    connect,
    wait_for,
)

# The first test also pays for installing and migrating Label Studio (once per machine); every
# wait inside has its own, much shorter, limit.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 300)]

CONNECTED, TRAINING = "CO", "TR"  # Label Studio's MLBackendState values


def pairwise(selected: str) -> list[dict[str, Any]]:
    return [
        {
            "from_name": "comparison",
            "to_name": "comparison",
            "type": "pairwise",
            "value": {"selected": selected},
        }
    ]


def ls_truth(ls: LabelStudio, project: Project) -> dict[int, tuple[str, str, str]]:
    """What Label Studio holds: annotation id -> (prompt, chosen, rejected)."""
    truth = {}
    for task_id in project.task_ids:
        data = project.task_data[task_id]
        for annotation in ls.annotations.list(id=task_id):
            selected = annotation.result[0]["value"]["selected"]
            left, right = data["answer1"], data["answer2"]
            chosen, rejected = (left, right) if selected == "left" else (right, left)
            truth[annotation.id] = (data["prompt"], chosen, rejected)
    return truth


def store_view(backend: Backend, project_id: int) -> dict[int, tuple[str, str, str]]:
    """What the backend stored: annotation id -> (prompt, chosen, rejected) of its one record."""
    ids = {a.annotation_id for a in backend.store.annotations(project_id)}
    records = backend.store.records(project_id, kind="preference")
    view = {r["annotation"]: (r["prompt"], r["chosen"], r["rejected"]) for r in records}
    if set(view) != ids or len(records) != len(ids):
        return {"annotations": sorted(ids), "records": records}  # type: ignore[dict-item]
    return view


def assert_store_matches(ls: LabelStudio, backend: Backend, project: Project) -> None:
    truth = ls_truth(ls, project)
    wait_for(
        lambda: store_view(backend, project.id) == truth,
        what=lambda: f"the store to hold {truth}; it holds {store_view(backend, project.id)}",
    )


def backend_credentials(backend: Backend) -> Credentials:
    """The backend's own view of its sealed credentials (its key file is in its data dir)."""
    config = BackendConfig(data_dir=backend.store.path.parent)
    return Credentials(config, backend.store, Vault.for_config(config))


def project_webhooks(ls: LabelStudio, project_id: int) -> list[Any]:
    return [h for h in ls.webhooks.list(project=str(project_id)) if h.project == project_id]


def ml_state(label_studio: LabelStudioServer, ml_id: int) -> str:
    response = label_studio.api("GET", f"/api/ml/{ml_id}")
    response.raise_for_status()
    return str(response.json()["state"])


def test_connect_marks_backend_connected_and_registers_project(
    label_studio: LabelStudioServer, backend: Backend, ls: LabelStudio, make_project: Any
) -> None:
    project = make_project()

    ml = connect(label_studio, project.id, backend)

    assert ml["state"] == CONNECTED, ml
    assert ml_state(label_studio, ml["id"]) == CONNECTED
    stored = backend.store.project(project.id)
    assert stored is not None
    assert stored.label_config == project.label_config
    # /setup carries the creator's legacy token: stored encrypted, bound to Label Studio's host.
    credentials = backend_credentials(backend)
    connection = credentials.connection(stored)
    assert connection is not None and connection.token == label_studio.token
    assert label_studio.token not in (stored.token_sealed or "")
    # Label Studio made exactly one webhook to us; the backend's sync found it, made no second,
    # and put the project's secret on it.
    hooks = wait_for(lambda: project_webhooks(ls, project.id), what="Label Studio's webhook")
    assert [h.url for h in hooks] == [backend.url + "/webhook"]
    assert hooks[0].send_payload and hooks[0].is_active
    assert hooks[0].headers == {WEBHOOK_SECRET_HEADER: credentials.webhook_secret(stored)}


def test_annotations_created_updated_deleted_reach_the_store(
    label_studio: LabelStudioServer, backend: Backend, ls: LabelStudio, make_project: Any
) -> None:
    project = make_project()
    connect(label_studio, project.id, backend)
    t0, t1, t2 = project.task_ids

    a0 = ls.annotations.create(id=t0, result=pairwise("left"))
    a1 = ls.annotations.create(id=t1, result=pairwise("right"))
    ls.annotations.create(id=t2, result=pairwise("left"))
    ls.annotations.create(id=t2, result=pairwise("right"))  # two annotators, one task
    assert_store_matches(ls, backend, project)
    assert len(backend.store.annotations(project.id)) == 4

    ls.annotations.update(id=a0.id, result=pairwise("right"))
    assert_store_matches(ls, backend, project)
    assert store_view(backend, project.id)[a0.id][1] == "8"  # now prefers answer2

    ls.annotations.delete(id=a1.id)  # one annotation: ANNOTATIONS_DELETED with one id
    assert_store_matches(ls, backend, project)

    # The data manager's "Delete annotations" action: one event naming several ids.
    response = label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "delete_tasks_annotations", "project": project.id},
        json={"selectedItems": {"all": False, "included": [t2]}},
    )
    assert response.status_code == 200, response.text
    assert_store_matches(ls, backend, project)
    assert [a.annotation_id for a in backend.store.annotations(project.id)] == [a0.id]


def test_start_training_queues_a_job(
    label_studio: LabelStudioServer, backend: Backend, ls: LabelStudio, make_project: Any
) -> None:
    project = make_project()
    ml = connect(label_studio, project.id, backend)
    ls.annotations.create(id=project.task_ids[0], result=pairwise("left"))
    assert_store_matches(ls, backend, project)

    def trainings() -> list[Any]:  # /setup also queues a reconcile job: count trainings only
        return [j for j in backend.store.jobs(project.id) if j.kind == "train"]

    assert trainings() == []

    response = label_studio.api("POST", f"/api/ml/{ml['id']}/train")

    assert response.status_code == 200, response.text
    jobs = wait_for(trainings, what="a training job")
    assert [(j.kind, j.trigger) for j in jobs] == [("train", "start_training")]
    # Label Studio marks the backend as training once our /webhook answered START_TRAINING.
    assert ml_state(label_studio, ml["id"]) in (TRAINING, CONNECTED)


def test_basic_auth_connects_and_fixes_the_webhook_header(
    label_studio: LabelStudioServer, auth_backend: Backend, ls: LabelStudio, make_project: Any
) -> None:
    assert auth_backend.auth is not None
    user, password = auth_backend.auth
    unauthenticated = requests.post(
        auth_backend.url + "/webhook", json={"action": "ANNOTATION_CREATED"}, timeout=10
    )
    assert unauthenticated.status_code == 401
    project = make_project()

    ml = connect(
        label_studio,
        project.id,
        auth_backend,
        auth_method="BASIC_AUTH",
        basic_auth_user=user,
        basic_auth_pass=password,
    )

    assert ml["state"] == CONNECTED, ml
    expected = requests.Request(auth=(user, password), url="http://x").prepare().headers
    hooks = wait_for(
        lambda: [h for h in project_webhooks(ls, project.id) if h.headers],
        timeout_s=60,
        what="the backend to put its Authorization header on Label Studio's webhook",
    )
    assert len(project_webhooks(ls, project.id)) == 1
    assert hooks[0].url == auth_backend.url + "/webhook"
    secret = backend_credentials(auth_backend).webhook_secret(
        auth_backend.store.project(project.id)
    )
    assert hooks[0].headers == {
        "Authorization": expected["Authorization"],
        WEBHOOK_SECRET_HEADER: secret,
    }

    ls.annotations.create(id=project.task_ids[0], result=pairwise("right"))
    assert_store_matches(ls, auth_backend, project)


def test_ground_truth_marks_reach_the_training_records(
    label_studio: LabelStudioServer, backend: Backend, ls: LabelStudio, make_project: Any
) -> None:
    project = make_project()
    connect(label_studio, project.id, backend)
    t0, t1, _ = project.task_ids

    gold = ls.annotations.create(id=t0, result=pairwise("left"), ground_truth=True)
    plain = ls.annotations.create(id=t1, result=pairwise("right"))

    def marks() -> dict[int, bool]:
        records = backend.store.records(project.id, kind="preference")
        return {r["annotation"]: r.get("ground_truth", False) for r in records}

    wait_for(
        lambda: marks() == {gold.id: True, plain.id: False},
        what=lambda: f"the gold mark on annotation {gold.id} only; records say {marks()}",
    )
    ls.annotations.update(id=plain.id, ground_truth=True)  # a reviewer marks it later
    wait_for(
        lambda: marks() == {gold.id: True, plain.id: True},
        what=lambda: f"the later mark on annotation {plain.id}; records say {marks()}",
    )
