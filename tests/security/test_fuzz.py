"""Fuzzed /setup and /webhook bodies, with and without proof: never a 5xx, and a refused
request (4xx) leaves every table of the store exactly as it was."""

from __future__ import annotations

import copy

import pytest
from conftest import TEST_WEBHOOK_SECRET, annotation_event, captured_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig

from .test_webhook_origin import table_rows

HEADER = "X-RLHF-Webhook-Secret"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ACTIONS = [
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "ANNOTATION_DELETED",
    "PROJECT_UPDATED",
    "START_TRAINING",
    "TASKS_CREATED",
]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
project_ids = st.sampled_from([1, 2, 0, -1, 2**63, "1"]) | json_values
headers = st.sampled_from([{}, {HEADER: TEST_WEBHOOK_SECRET}, {HEADER: "wrong"}, {HEADER: ""}])


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """Project 1 connected (its own secret unknown to the fuzzer), project 2 not."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    app = create_app(BackendConfig(data_dir=tmp_path, webhook_secret=TEST_WEBHOOK_SECRET))
    setup = captured_body("01_setup")
    setup["hostname"] = setup["access_token"] = None
    http = app.test_client()
    assert http.post("/setup", json=setup).status_code == 200
    headers = {HEADER: TEST_WEBHOOK_SECRET}
    assert http.post("/webhook", json=annotation_event(1), headers=headers).status_code == 200
    return http, app.extensions["rlhf"].store


def assert_clean_and_refusals_store_nothing(http, store, path, body, headers) -> None:
    before = table_rows(store)
    answer = http.post(path, json=body, headers=headers)
    assert answer.status_code < 500, answer.get_data()[:500]
    if answer.status_code >= 400:
        error = answer.get_json()
        assert set(error) == {"error", "message"} and error["message"]
        assert table_rows(store) == before


@st.composite
def webhook_bodies(draw):
    base = draw(
        st.sampled_from(
            [
                annotation_event(5),
                captured_body("07_webhook_annotations_deleted"),
                captured_body("08_webhook_start_training"),
            ]
        )
    )
    body = copy.deepcopy(base)
    body["action"] = draw(st.sampled_from(ACTIONS) | json_values)
    if draw(st.booleans()):
        body["project"] = draw(project_ids)
    elif isinstance(body.get("project"), dict):
        body["project"]["id"] = draw(project_ids)
    for key in draw(st.lists(st.sampled_from(["annotation", "task", "annotations"]), max_size=2)):
        body[key] = draw(json_values)
    return body


@FUZZ
@given(body=webhook_bodies(), headers=headers)
def test_fuzzed_webhooks_never_5xx_and_refusals_store_nothing(backend, body, headers):
    http, store = backend
    assert_clean_and_refusals_store_nothing(http, store, "/webhook", body, headers)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "project": st.sampled_from(["1.1795430590", "3.1", "x"]) | project_ids,
            "schema": st.just(captured_body("01_setup")["schema"]) | json_values,
            "hostname": st.sampled_from(["http://127.0.0.1:9", "ftp://x", "http://"]) | json_values,
            "access_token": json_values,
        },
    )
    | json_values
)
def test_fuzzed_setups_never_5xx_and_refusals_store_nothing(backend, body):
    http, store = backend
    assert_clean_and_refusals_store_nothing(http, store, "/setup", body, {})
