"""Attacks 2 and 3: planting a webhook through /setup, and writing training data via /webhook.

A fake Label Studio (a real loopback listener) records what the backend does to the project's
webhook; the secret a test sends is the one the backend put there.
"""

from __future__ import annotations

import base64
import time

import pytest
from conftest import annotation_event, captured_body
from fake_label_studio import FakeLabelStudio

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig

HEADER = "X-RLHF-Webhook-Secret"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
BACKEND = "http://localhost"  # the Flask test client's address: where Label Studio reaches us


@pytest.fixture
def label_studio():
    with FakeLabelStudio(projects=[1], ml_backend_urls=[BACKEND]) as fake:
        # Label Studio's own webhook, made when the model was connected: no headers.
        fake.webhooks.append(
            {"id": 1, "project": 1, "url": BACKEND + "/webhook", "headers": {}, "is_active": True}
        )
        yield fake


def wait_for(probe, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def table_rows(store) -> dict:
    tables = ["projects", "label_configs", "annotations", "records", "jobs"]
    with store.db.read() as conn:
        return {
            t: [tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY 1")]
            for t in tables
        }


@pytest.fixture
def connected(tmp_path, label_studio):
    """A backend with project 1 connected by Label Studio (defaults: no auth, no secrets set)."""
    app = create_app(BackendConfig(data_dir=tmp_path))
    http = app.test_client()
    setup = captured_body("01_setup")
    setup["hostname"], setup["access_token"] = label_studio.url, TOKEN
    assert http.post("/setup", json=setup).status_code == 200
    [write] = wait_for(label_studio.webhook_writes)
    return http, app.extensions["rlhf"].store, write.body["headers"]


def test_backend_puts_a_secret_on_the_projects_webhook(connected, label_studio):
    _, _, headers = connected
    assert len(headers[HEADER]) >= 32
    assert label_studio.webhooks[0]["url"] == BACKEND + "/webhook"  # fixed, not a second one
    assert len(label_studio.webhooks) == 1


def test_annotation_with_the_webhooks_secret_is_stored(connected):
    http, store, headers = connected
    answer = http.post("/webhook", json=annotation_event(7), headers=headers)
    assert answer.status_code == 200
    assert [a.annotation_id for a in store.annotations(1)] == [7]


@pytest.mark.parametrize("presented", [None, "wrong-secret", ""])
def test_annotation_without_the_secret_is_refused_and_nothing_stored(connected, presented):
    http, store, _ = connected
    before = table_rows(store)
    headers = {} if presented is None else {HEADER: presented}
    answer = http.post("/webhook", json=annotation_event(7), headers=headers)
    assert answer.status_code == 401
    body = answer.get_json()
    assert body["error"] == "UnprovenWebhook" and HEADER in body["message"]
    assert "WWW-Authenticate" not in answer.headers  # no browser login prompt: not basic auth
    assert "RLHF_WEBHOOK_SECRET" in body["message"]  # says what to add by hand
    assert table_rows(store) == before


def test_unproven_deletion_and_project_update_change_nothing(connected, annotation_event):
    http, store, headers = connected
    assert http.post("/webhook", json=annotation_event(7), headers=headers).status_code == 200
    before = table_rows(store)
    delete = captured_body("07_webhook_annotations_deleted")
    delete["annotations"] = [{"id": 7}]
    delete["project"]["id"] = 1
    update = captured_body("08_webhook_start_training")
    update["action"] = "PROJECT_UPDATED"
    update["project"]["label_config"] = '<View><Text name="x" value="$x"/></View>'
    for event in (delete, update):
        assert http.post("/webhook", json=event).status_code == 401
    assert table_rows(store) == before


def test_start_training_from_label_studios_ml_client_queues_one_job(connected):
    """START_TRAINING arrives without the secret (captured): accepted for a connected project,
    it queues at most one job and never changes the project."""
    http, store, _ = connected
    start = captured_body("08_webhook_start_training")
    start["project"]["label_config"] = '<View><Text name="x" value="$x"/></View>'
    config_before = store.project(1).label_config
    answers = [http.post("/webhook", json=start) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.get_json()["status"] for a in answers] == ["queued", "coalesced", "coalesced"]
    assert len([j for j in store.jobs(1) if j.kind == "train"]) == 1  # /setup queued a reconcile
    assert store.project(1).label_config == config_before


def test_events_for_a_project_never_connected_are_refused(tmp_path):
    app = create_app(BackendConfig(data_dir=tmp_path))
    http = app.test_client()
    store = app.extensions["rlhf"].store
    before = table_rows(store)
    for event in (annotation_event(7, project_id=9), captured_body("08_webhook_start_training")):
        answer = http.post("/webhook", json=event)
        assert answer.status_code == 401, answer.get_json()
        assert "not connected" in answer.get_json()["message"]
    assert table_rows(store) == before


def test_the_operators_webhook_secret_is_accepted_for_every_project(tmp_path):
    secret = "operator-secret-0123456789"
    http = create_app(BackendConfig(data_dir=tmp_path, webhook_secret=secret)).test_client()
    answer = http.post("/webhook", json=annotation_event(7, project_id=9), headers={HEADER: secret})
    assert answer.status_code == 200 and answer.get_json()["status"] == "stored"
    wrong = http.post("/webhook", json=annotation_event(8, project_id=9), headers={HEADER: "x"})
    assert wrong.status_code == 401


def test_basic_auth_and_the_secret_both_go_on_the_webhook(tmp_path, label_studio):
    config = BackendConfig(data_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="p" * 12)
    http = create_app(config).test_client()
    setup = captured_body("01_setup")
    setup["hostname"], setup["access_token"] = label_studio.url, TOKEN
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:" + b"p" * 12).decode()}
    assert http.post("/setup", json=setup, headers=auth).status_code == 200
    [write] = wait_for(label_studio.webhook_writes)
    assert set(write.body["headers"]) == {"Authorization", HEADER}
    assert write.body["headers"]["Authorization"] == auth["Authorization"]
    assert http.post("/webhook", json=annotation_event(7), headers=auth).status_code == 401
    proven = http.post("/webhook", json=annotation_event(7), headers=write.body["headers"])
    assert proven.status_code == 200


def webhook_activity(label_studio: FakeLabelStudio):
    """Enough of the backend's webhook sync to judge: a webhook write, or two attempts."""
    ml_lists = [s for s in label_studio.seen if s.path.startswith("/api/ml")]
    return label_studio.webhook_writes() or len(ml_lists) >= 2


def settle(label_studio: FakeLabelStudio, timeout_s: float = 10.0) -> None:
    """Wait until the backend's webhook sync wrote a webhook or tried twice (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not webhook_activity(label_studio) and time.monotonic() < deadline:
        time.sleep(0.05)


def planted(label_studio: FakeLabelStudio) -> list:
    return [w for w in label_studio.webhook_writes() if "evil" in (w.body or {}).get("url", "")]


def test_forged_host_header_plants_no_webhook_with_the_operators_key(tmp_path, label_studio):
    """Attack 2: with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY configured, a /setup sent under
    another Host must not make Label Studio send the project's annotations there."""
    label_studio.webhooks.clear()
    config = BackendConfig(
        data_dir=tmp_path, label_studio_url=label_studio.url, label_studio_api_key=TOKEN
    )
    evil = create_app(config).test_client()
    setup = captured_body("01_setup")
    answer = evil.post("/setup", json=setup, base_url="http://evil.example:8000")
    assert answer.status_code == 200
    settle(label_studio)
    assert planted(label_studio) == []


def test_forged_host_header_plants_no_webhook_with_the_stored_token(tmp_path, label_studio):
    """The same with defaults: the sync uses the project's stored token, but never the Host."""
    label_studio.webhooks.clear()
    app = create_app(BackendConfig(data_dir=tmp_path))
    setup = captured_body("01_setup")
    setup["hostname"], setup["access_token"] = label_studio.url, TOKEN
    assert app.test_client().post("/setup", json=setup).status_code == 200
    wait_for(lambda: webhook_activity(label_studio))  # the legitimate sync
    with label_studio.lock:
        label_studio.seen.clear()
    setup["access_token"] = None  # the attacker has no token
    answer = app.test_client().post("/setup", json=setup, base_url="http://evil.example:8000")
    assert answer.status_code == 200
    settle(label_studio)
    assert planted(label_studio) == []
