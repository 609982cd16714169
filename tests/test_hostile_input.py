"""Hostile, huge and unusual input (issue 19): each cause of a 500 the fuzzing found, and the
resources a request could grow without bound. In-process (Flask test client, real store and
reward model); the property-based suite over a real server is tests/test_malformed.py."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig
from rlhf_core.label_schema import parse_label_config
from rlhf_core.store import JOB_PREANNOTATE, Store
from tests.conftest import TEST_WEBHOOK_SECRET, annotation_event, captured_body, webhook_client

PAIRWISE = captured_body("01_setup")["schema"]
LONE = "\ud800"


def post(http, path: str, body: Any):
    """JSON with lone surrogates spelled as ``\\ud800`` escapes, as a hostile client sends them."""
    return http.post(path, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def config(tmp_path) -> BackendConfig:
    # preselect: these tests read the answers a prediction pre-selects (RLHF_PRESELECT=1).
    return BackendConfig(data_dir=tmp_path, webhook_secret=TEST_WEBHOOK_SECRET, preselect=1)


@pytest.fixture
def http(config):
    """Sends WEBHOOK_HEADERS: the webhooks below prove their origin, as Label Studio's do."""
    return webhook_client(config)


@pytest.fixture
def store(http) -> Store:
    return http.application.extensions["rlhf"].store


def setup(http, schema: str = PAIRWISE, project: int = 1, **extra: Any):
    return post(http, "/setup", {"project": f"{project}.1700000000", "schema": schema, **extra})


def scrape(http) -> str:
    answer = http.get("/metrics")
    assert answer.status_code == 200
    return answer.get_data(as_text=True)


# -- cause 1: several preference controls in one config --------------------------------------------

RANKER_AND_PAIRWISE = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/>'
    '<Pairwise name="cmp" toName="answer1,answer2"/>'
    '<List name="cands" value="$cands" title="Candidates"/><Ranker name="rank" toName="cands"/>'
    '<Rating name="stars" toName="answer1"/>'
    '<List name="more" value="$more" title="More"/><Ranker name="rank2" toName="more"/>'
    "</View>"
)
MIXED_TASK = {
    "prompt": "Capital of France?",
    "answer1": "Paris",
    "answer2": "Lyon",
    "cands": [{"id": "x", "body": "Paris."}, {"id": "y", "body": "Marseille."}],
    "more": [{"id": "m1", "body": "Nice."}, {"id": "m2", "body": "Lille."}],
}


def test_every_control_of_a_config_with_ranker_pairwise_and_rating_is_predicted(http):
    answer = post(
        http,
        "/predict",
        {"project": "1", "label_config": RANKER_AND_PAIRWISE, "tasks": [{"data": MIXED_TASK}]},
    )

    assert answer.status_code == 200, answer.get_json()
    [[prediction]] = answer.get_json()["results"]
    by_control = {r["from_name"]: r["value"] for r in prediction["result"]}
    assert set(by_control) == {"cmp", "rank", "stars", "rank2"}
    assert by_control["cmp"]["selected"] in ("left", "right")
    assert sorted(by_control["rank"]["ranker"]["rank"]) == ["x", "y"]  # its own List's ids
    assert sorted(by_control["rank2"]["ranker"]["rank2"]) == ["m1", "m2"]


# -- causes 2, 3, 6: lone surrogates ---------------------------------------------------------------


def test_lone_surrogate_in_task_text_is_predicted(http):
    task = {"data": {"prompt": f"hi {LONE}", "answer1": LONE, "answer2": "b"}}
    answer = post(http, "/predict", {"project": "1", "label_config": PAIRWISE, "tasks": [task]})

    assert answer.status_code == 200
    assert answer.get_json()["results"][0][0]["result"][0]["from_name"] == "comparison"


def test_lone_surrogate_in_setup_token_is_stored_replaced(http, store):
    answer = setup(http, hostname="http://127.0.0.1:9", access_token=f"t{LONE}")

    assert answer.status_code == 200
    connection = http.application.extensions["rlhf"].credentials.connection(store.project(1))
    assert (connection.url, connection.token) == ("http://127.0.0.1:9", "t\ufffd")


def test_lone_surrogate_in_setup_hostname_is_a_400_storing_nothing(http, store):
    # Cleaned to "http://h\ufffd", a host name no HTTP client can send: refused, not kept.
    answer = setup(http, hostname=f"http://h{LONE}", access_token="t")

    assert answer.status_code == 400
    assert "hostname" in answer.get_json()["message"]
    assert store.project(1) is None


def test_lone_surrogate_in_webhook_label_config_is_not_a_500(http, store):
    body = annotation_event(5, label_config=PAIRWISE.replace("<View>", f"<View>{LONE}"))
    answer = post(http, "/webhook", body)

    assert answer.status_code == 200
    assert answer.get_json()["records"] == 1


# -- cause 4: one XML parser -----------------------------------------------------------------------

NON_ASCII_NAMES = PAIRWISE.replace("<View>", '<View \u017f="1">')


def test_config_with_a_non_ascii_attribute_name_works_on_every_endpoint(http, store):
    assert setup(http, NON_ASCII_NAMES).status_code == 200
    stored = post(http, "/webhook", annotation_event(7, label_config=NON_ASCII_NAMES))
    predicted = post(http, "/predict", captured_body("04_predict") | {"project": "1.1"})

    assert stored.status_code == 200 and stored.get_json()["records"] == 1
    assert [a.annotation_id for a in store.annotations(1)] == [7]
    assert predicted.status_code == 200


# -- cause 5: every id range-checked ---------------------------------------------------------------


@pytest.mark.parametrize("project", [2**63, -1, 10**30])
def test_bare_project_id_out_of_range_is_a_400(http, store, project):
    body = {"action": "START_TRAINING", "project": project}

    answer = post(http, "/webhook", body)

    assert answer.status_code == 400
    assert "2**63-1" in answer.get_json()["message"]


# -- cause 7: metric labels from closed sets -------------------------------------------------------


def test_hostile_actions_and_methods_are_counted_as_other_and_metrics_still_scrape(http):
    for action in (LONE, "X" * 10_000, "ANNOTATION_CREATEDX"):
        assert post(http, "/webhook", {"action": action}).status_code == 200
    http.open("/webhook", method="BREW")
    assert post(http, "/webhook", {"action": "TASKS_CREATED"}).status_code == 200

    text = scrape(http)
    assert 'rlhf_webhook_events_total{action="other"} 3.0' in text
    assert 'rlhf_webhook_events_total{action="TASKS_CREATED"} 1.0' in text
    assert "XXXX" not in text and "BREW" not in text
    assert 'method="other"' in text


# -- rankings are stored as rankings ---------------------------------------------------------------

RANKING = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<List name="candidates" value="$candidates" title="Candidates"/>'
    '<Ranker name="rank" toName="candidates"/></View>'
)


def test_a_600_item_ranking_is_stored_as_one_record(http, store):
    items = [{"id": f"i{k}", "body": f"response number {k}"} for k in range(600)]
    body = annotation_event(
        9,
        label_config=RANKING,
        task_data={"prompt": "rank these", "candidates": items},
        result=[
            {
                "from_name": "rank",
                "to_name": "candidates",
                "type": "ranker",
                "value": {"ranker": {"rank": [i["id"] for i in items]}},
            }
        ],
    )

    answer = post(http, "/webhook", body)

    assert answer.status_code == 200 and answer.get_json()["records"] == 1
    [record] = store.records(1)
    assert len(record["ranking"]) == 600
    assert store.records(1, "preference") == []


# -- label configs: bounded, deduplicated, never replaced by an unusable one, collected ------------


@pytest.fixture
def small_configs(tmp_path) -> BackendConfig:
    return BackendConfig(
        data_dir=tmp_path,
        webhook_secret=TEST_WEBHOOK_SECRET,
        max_label_config_bytes=len(PAIRWISE) + 100,
    )


def test_a_config_over_the_size_limit_is_a_413_and_not_stored(small_configs):
    http = webhook_client(small_configs)
    store = http.application.extensions["rlhf"].store
    big = PAIRWISE.replace("<View>", "<View>" + "<!-- padding -->" * 20)

    assert setup(http, big).status_code == 413
    assert post(http, "/webhook", annotation_event(1, label_config=big)).status_code == 413
    assert store.project(1) is None and store.annotations(1) == []
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM label_configs").fetchone()[0] == 0


UNUSABLE = '<View><Text name="t" value="$t"/></View>'


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "PROJECT_UPDATED", "START_TRAINING"])
def test_a_webhook_never_replaces_a_working_config_with_one_setup_refuses(http, store, action):
    assert setup(http).status_code == 200
    body = annotation_event(3, action=action, label_config=UNUSABLE)

    answer = post(http, "/webhook", body)

    assert answer.status_code == 200
    assert answer.get_json()["label_config"].startswith("refused, the working one kept")
    assert store.project(1).label_config == PAIRWISE
    if action == "ANNOTATION_CREATED":
        assert answer.get_json()["records"] == 1


def test_an_unknown_project_with_an_unusable_config_is_refused_storing_nothing(http, store):
    answer = post(http, "/webhook", annotation_event(3, label_config=UNUSABLE))

    assert answer.status_code == 422
    assert store.project(1) is None and store.annotations(1) == []


def test_replaced_configs_no_longer_referenced_are_collected(http, store):
    for n in range(5):
        assert setup(http, PAIRWISE.replace("<View>", f"<View><!-- {n} -->")).status_code == 200

    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM label_configs").fetchone()[0] == 1


def test_the_parse_cache_is_bounded_by_bytes():
    from rlhf_core.label_schema import _ParseCache

    cache = _ParseCache(budget=3 * len(PAIRWISE) + 50)
    configs = [PAIRWISE.replace("<View>", f"<View><!-- {n} -->") for n in range(10)]

    schemas = [cache.get(xml) for xml in configs]

    assert schemas[0] == parse_label_config(PAIRWISE)
    assert len(cache._entries) == 3
    assert cache._bytes <= cache.budget


# -- annotations keyed by project ------------------------------------------------------------------


def test_one_annotation_id_in_two_projects_is_two_annotations(http, store):
    for project in (1, 2):
        answer = post(http, "/webhook", annotation_event(42, project_id=project))
        assert answer.json["status"] == "stored"

    deleted = {"action": "ANNOTATIONS_DELETED", "project": {"id": 2}, "annotations": [{"id": 42}]}
    assert post(http, "/webhook", deleted).status_code == 200

    assert [a.annotation_id for a in store.annotations(1)] == [42]
    assert store.annotations(2) == []
    assert len(store.records(1)) == 1 and store.records(2) == []


def test_a_store_keyed_by_annotation_id_alone_is_migrated_on_open(tmp_path):
    path = tmp_path / "store.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """CREATE TABLE annotations (annotation_id INTEGER PRIMARY KEY,
                   project_id INTEGER NOT NULL, task_id INTEGER, annotator INTEGER,
                   config_hash TEXT, task_data TEXT, result TEXT,
                   was_cancelled INTEGER NOT NULL DEFAULT 0,
                   ls_updated_at TEXT NOT NULL DEFAULT '', deleted INTEGER NOT NULL DEFAULT 0,
                   kinds TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL, stored_at REAL NOT NULL);
               CREATE TABLE records (record_id INTEGER PRIMARY KEY AUTOINCREMENT,
                   annotation_id INTEGER NOT NULL, project_id INTEGER NOT NULL,
                   kind TEXT NOT NULL, payload TEXT NOT NULL);
               CREATE INDEX records_annotation ON records(annotation_id);
               INSERT INTO annotations VALUES
                   (1, 7, 10, 3, NULL, '{"p": 1}', '[]', 0, 'x', 0, 'preference', 1, 0),
                   (2, 7, 11, 3, NULL, NULL, NULL, 0, '', 1, '', 2, 0);"""
        )

    store = Store(path).initialize()

    assert [(a.annotation_id, a.task_data) for a in store.annotations(7)] == [(1, {"p": 1})]
    with sqlite3.connect(path) as conn:
        key = {row[1]: row[5] for row in conn.execute("PRAGMA table_info(annotations)")}
        assert (key["project_id"], key["annotation_id"]) == (1, 2)
        assert conn.execute("SELECT deleted FROM annotations WHERE annotation_id = 2").fetchone()
    Store(path).initialize()  # opening again changes nothing


# -- /predict: bounded in tasks and in time --------------------------------------------------------


def test_more_tasks_than_the_setting_is_a_413(tmp_path):
    http = create_app(BackendConfig(data_dir=tmp_path, predict_max_tasks=2)).test_client()
    body = captured_body("04_predict")
    body["tasks"] = body["tasks"] * 2

    answer = post(http, "/predict", body)

    assert answer.status_code == 413
    assert "RLHF_PREDICT_MAX_TASKS" in answer.get_json()["message"]


def test_tasks_past_the_time_budget_are_handed_to_a_preannotation_job(tmp_path):
    # A budget no chunk fits in: the first chunk is answered, every later task is handed off.
    config = BackendConfig(data_dir=tmp_path, predict_time_budget_s=1e-9)
    http = create_app(config).test_client()
    store = http.application.extensions["rlhf"].store
    assert setup(http, hostname="http://127.0.0.1:9", access_token="t").status_code == 200
    task = captured_body("04_predict")["tasks"][0]
    tasks = [{**task, "id": n} for n in range(40)]

    answer = post(http, "/predict", {"project": "1.1", "tasks": tasks}).get_json()

    results = answer["results"]
    assert len(results) == 40  # Label Studio matches answers to tasks by position
    assert all(r for r in results[:32]) and not any(results[32:])
    assert answer["handed_off"]["tasks"] == 8
    [job] = [j for j in store.jobs(1) if j.kind != "reconcile"]  # /setup queued a reconcile
    assert (job.kind, job.job_id) == (JOB_PREANNOTATE, answer["handed_off"]["job_id"])


def test_a_chunk_is_started_only_if_the_slowest_so_far_still_fits_the_budget(monkeypatch):
    import numpy as np

    from rlhf_core import predict

    clock = [0.0]
    monkeypatch.setattr(predict.time, "monotonic", lambda: clock[0])

    def ten_seconds_per_chunk(items):
        clock[0] += 10.0
        rewards = [np.zeros((len(texts), 4)) for _, texts in items]
        return rewards, [np.eye(len(texts), 8) for _, texts in items]  # (n, K), (n, H)

    task = captured_body("04_predict")["tasks"][0]
    timed = predict.predict_in_time(
        parse_label_config(PAIRWISE),
        [task] * 100,
        ten_seconds_per_chunk,
        "v",
        budget_s=25.0,
        chunk=10,
    )

    # 0 s: chunk 1 (to 10 s); 10 + 10 <= 25: chunk 2 (to 20 s); 20 + 10 > 25: the rest waits.
    assert (timed.unreached, sum(1 for r in timed.results if r)) == (80, 20)
    assert len(timed.results) == 100
