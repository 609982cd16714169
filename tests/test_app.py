"""The HTTP protocol Label Studio speaks, against the captured 1.23.2 requests.

The tests on the ``config`` fixture (setup, predict, webhook intake, jobs, metrics) run on SQLite
and on PostgreSQL."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import TEST_WEBHOOK_SECRET, WEBHOOK_HEADERS, webhook_client

from ml_backend.app import create_app, parse_project_id
from rlhf_core.config import BackendConfig
from rlhf_core.errors import BadRequest
from rlhf_core.vault import Vault

FIXTURES = Path(__file__).parent / "fixtures"


def capture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["body"]


@pytest.fixture
def config(db_config):
    return db_config


@pytest.fixture
def http(config):
    return webhook_client(config)


@pytest.fixture
def app(http):
    return http.application


@pytest.fixture
def store(app):
    return app.extensions["rlhf"].store


def test_health_reports_up_model_class_and_version(http):
    for path in ("/", "/health"):
        body = http.get(path).get_json()
        assert body == {
            "status": "UP",
            "model_class": "RLHFBackend",
            "model_version": "rm-untrained.policy-base",
        }


def test_setup_remembers_project_config_and_label_studio(http, store, config):
    body = capture("01_setup.json")
    response = http.post("/setup", json=body)
    assert response.status_code == 200
    assert response.get_json() == {"model_version": "rm-untrained.policy-base"}
    project = store.project(1)
    assert project.label_config == body["schema"]
    assert project.hostname == "http://localhost:8080"
    assert "REDACTED-PROJECT-TOKEN" not in project.token_sealed  # encrypted at rest
    assert Vault.for_config(config).open(project.token_sealed) == "REDACTED-PROJECT-TOKEN"


def test_setup_rejects_unservable_config_naming_the_missing_tag(http, store):
    schema = (
        '<View><Text name="text" value="$text"/><Choices name="c" toName="text">'
        '<Choice value="positive"/><Choice value="negative"/></Choices></View>'
    )
    response = http.post("/setup", json={"project": "7.1700000000", "schema": schema})
    assert response.status_code == 422
    assert "Pairwise" in response.get_json()["message"]
    assert store.project(7) is None


def test_setup_requires_schema_and_project(http):
    assert http.post("/setup", json={"project": "1.2"}).status_code == 400
    assert http.post("/setup", json={"schema": "<View/>"}).status_code == 400


def test_predict_by_default_scores_each_task_without_preselecting_an_answer(http):
    """No anchoring unless asked for: the score orders the tasks, the result suggests nothing
    (Label Studio's "Use predictions to prelabel tasks" then has nothing to fill in)."""
    http.post("/setup", json=capture("01_setup.json"))
    body = capture("04_predict.json")
    results = http.post("/predict", json=body).get_json()["results"]
    assert len(results) == len(body["tasks"]) == 2
    for [prediction] in results:
        assert prediction["model_version"] == "rm-untrained.policy-base"
        assert prediction["result"] == []
        assert 0.0 <= prediction["score"] <= 1.0


def test_predict_with_preselect_answers_each_task_with_a_pairwise_choice(tmp_path):
    http = webhook_client(
        BackendConfig(data_dir=tmp_path, webhook_secret=TEST_WEBHOOK_SECRET, preselect=1)
    )
    http.post("/setup", json=capture("01_setup.json"))
    body = capture("04_predict.json")
    response = http.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"]) == 2
    for [prediction] in results:  # one prediction per task, as Label Studio 1.23 reads them
        assert prediction["model_version"] == "rm-untrained.policy-base"
        [choice] = prediction["result"]
        assert (choice["from_name"], choice["to_name"], choice["type"]) == (
            "comparison",
            "answer1",
            "pairwise",
        )
        assert choice["value"]["selected"] in ("left", "right")
        assert 0.0 <= prediction["score"] <= 1.0


def test_predict_reads_the_labels_of_its_tasks_only_not_the_whole_project(
    http, store, annotation_event, monkeypatch
):
    """/predict asks the store for the records of the request's tasks; reading the project's
    records and filtering them here would fetch every task's."""
    for task_id in range(1, 13):
        response = http.post("/webhook", json=annotation_event(task_id, task_id=task_id))
        assert response.status_code == 200
    real_records = store.records
    fetched: list[tuple[object, list[dict]]] = []

    def records_spy(project_id, kind=None, tasks=None):
        found = real_records(project_id, kind, tasks)
        fetched.append((tasks, found))
        return found

    monkeypatch.setattr(store, "records", records_spy)
    body = capture("04_predict.json")  # tasks 1 and 2
    assert http.post("/predict", json=body).status_code == 200
    assert fetched and all(tasks == {1, 2} for tasks, _ in fetched)
    assert sorted(r["task"] for _, found in fetched for r in found) == [1, 2]


def test_predict_rejects_tasks_that_are_not_a_list(http):
    response = http.post("/predict", json={"tasks": {"id": 1}})
    assert response.status_code == 400
    assert "tasks" in response.get_json()["message"]


def test_webhook_stores_then_answers(http, store):
    response = http.post("/webhook", json=capture("05_webhook_annotation_created.json"))
    assert response.status_code == 200
    assert response.get_json()["status"] == "stored"
    [record] = store.records(1, "preference")
    assert (record["chosen"], record["rejected"]) == ("go away", "hello")


def test_start_training_queues_one_job_and_coalesces_bursts(http, store):
    for _ in range(5):
        assert (
            http.post("/webhook", json=capture("08_webhook_start_training.json")).status_code == 200
        )
    jobs = store.jobs(1)
    assert [(j.trigger, j.status) for j in jobs] == [("start_training", "queued")]


def test_unknown_action_is_acknowledged_and_ignored(http, store):
    response = http.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1}})
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored"
    assert store.annotations(1) == []


def test_body_over_limit_gets_413(tmp_path):
    app = create_app(BackendConfig(data_dir=tmp_path, max_body_bytes=1024))
    response = app.test_client().post("/webhook", data=b"{" + b" " * 4096 + b"}")
    assert response.status_code == 413
    assert "error" in response.get_json()


def test_metrics_expose_requests_annotations_queue_and_versions(http, store):
    http.post("/webhook", json=capture("05_webhook_annotation_created.json"))
    http.post("/webhook", json=capture("08_webhook_start_training.json"))
    text = http.get("/metrics").get_data(as_text=True)
    assert 'rlhf_annotations_stored{kind="preference"} 1.0' in text
    assert "rlhf_training_queue_depth 1.0" in text
    assert (
        'rlhf_model_version_info{model_version="rm-untrained.policy-base",project="1"} 1.0' in text
    )
    assert 'rlhf_http_requests_total{endpoint="webhook",method="POST",status="200"} 2.0' in text
    assert "rlhf_http_request_duration_seconds_bucket" in text


def test_metrics_show_the_progress_of_a_running_training_job(http, store):
    from trainer.jobs import job_progress

    http.post("/webhook", json=capture("05_webhook_annotation_created.json"))
    http.post("/webhook", json=capture("08_webhook_start_training.json"))
    job = store.claim_job("test-worker")
    progress = job_progress(store, job, "reward model", every_s=0.0)
    progress(3, 10, 0.5)
    text = http.get("/metrics").get_data(as_text=True)
    labels = f'job="{job.job_id}",phase="reward model",project="1"'
    assert f"rlhf_training_step{{{labels}}} 3.0" in text
    assert f"rlhf_training_total_steps{{{labels}}} 10.0" in text
    assert f"rlhf_training_loss{{{labels}}} 0.5" in text
    assert f"rlhf_training_eta_seconds{{{labels}}}" in text
    store.finish_job(job.job_id, "done")
    assert "rlhf_training_step{" not in http.get("/metrics").get_data(as_text=True)


@pytest.mark.parametrize(("value", "expected"), [("1.1795430590", 1), ("12", 12), (3, 3)])
def test_parse_project_id_accepts_label_studio_forms(value, expected):
    assert parse_project_id(value) == expected


@pytest.mark.parametrize("value", [None, "", "abc", "x.1", True, 1.5, [1]])
def test_parse_project_id_rejects_others(value):
    with pytest.raises(BadRequest):
        parse_project_id(value)


class TestBasicAuth:
    @pytest.fixture
    def http(self, tmp_path):
        config = BackendConfig(
            data_dir=tmp_path,
            basic_auth_user="ls",
            basic_auth_pass="s3cret",
            webhook_secret=TEST_WEBHOOK_SECRET,
        )
        return create_app(config).test_client()

    @staticmethod
    def auth(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def test_health_stays_open(self, http):
        assert http.get("/health").status_code == 200

    @pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
    def test_post_endpoints_need_credentials(self, http, path):
        response = http.post(path, json={})
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert http.post(path, json={}, headers=self.auth("ls", "wrong")).status_code == 401

    def test_metrics_need_credentials(self, http):
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=self.auth("ls", "s3cret")).status_code == 200

    def test_right_credentials_pass(self, http):
        body = capture("05_webhook_annotation_created.json")
        headers = {**self.auth("ls", "s3cret"), **WEBHOOK_HEADERS}
        response = http.post("/webhook", json=body, headers=headers)
        assert response.status_code == 200
