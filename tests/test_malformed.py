"""Malformed requests get a 4xx with a JSON error, never a 5xx, and never harm stored data.

One real server (gunicorn, 2 workers, a 32 KiB body limit) takes a few hundred bad requests on
every endpoint: bodies that are not JSON or not UTF-8, JSON of the wrong type, missing fields,
fields of the wrong type, unknown projects, bodies over the limit, label configs the backend
cannot learn from, unknown paths and wrong methods. Hand-written cases pin the exact status;
hypothesis mutates the captured Label Studio payloads (tests/fixtures: the traffic a real Label
Studio 1.23.2 sent) and the label_configs/ templates for the rest, with hostile strings (lone
surrogates, non-ASCII names, very long values) among the values. After every request that was
refused (4xx) the store holds exactly what it held before; after every test the server still
answers ``/health``, ``/metrics`` still scrapes (and parses), its log has no traceback, and the
annotations stored before are exactly as they were.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import WEBHOOK_HEADERS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ml_backend.app import parse_project_id
from rlhf_core.errors import BadRequest
from rlhf_core.label_schema import parse_label_config

pytestmark = pytest.mark.slow

MAX_BODY = 32 * 1024
PROJECT = 1  # set up before the tests; the fuzzed requests never address it
PRESTORED = range(900_001, 900_021)
SERVER_ENV = {
    "RLHF_MAX_BODY_BYTES": str(MAX_BODY),
    # /setup may start a webhook registration: keep it on loopback whatever hostname is sent.
    "LABEL_STUDIO_URL": "http://127.0.0.1:9",
    # Above every template (2.7 KB at most) and below what the fuzzed configs can reach.
    "RLHF_MAX_LABEL_CONFIG_BYTES": "6000",
}
TEMPLATES_DIR = Path(__file__).parent.parent / "label_configs"
TEMPLATES = sorted(TEMPLATES_DIR.glob("*.xml"))
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the server and snapshot span all examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# -- the server, its stored annotations, and the checks after each test -------------------------


@pytest.fixture(scope="module")
def backend(module_server_factory, captured, annotation_event):
    server = module_server_factory(env=SERVER_ENV)
    setup = captured("01_setup")
    del setup["hostname"], setup["access_token"]
    assert requests.post(f"{server.url}/setup", json=setup, timeout=30).status_code == 200
    with requests.Session() as session:
        for annotation_id in PRESTORED:
            body = annotation_event(annotation_id, task_id=annotation_id)
            answer = session.post(
                f"{server.url}/webhook", json=body, headers=WEBHOOK_HEADERS, timeout=30
            )
            assert answer.json()["status"] == "stored"
    return server


def snapshot(server) -> tuple[Any, ...]:
    """The pre-stored annotations, their records and their project, as the store holds them."""
    store = server.store()
    annotations = [a for a in store.annotations(PROJECT) if a.annotation_id in PRESTORED]
    records = [r for r in store.records(PROJECT) if r["annotation"] in PRESTORED]
    return annotations, records, store.project(PROJECT)


@pytest.fixture(autouse=True)
def unharmed(backend):
    before = snapshot(backend)
    assert len(before[0]) == len(before[1]) == len(PRESTORED)
    log_offset = backend.log_path.stat().st_size
    yield
    assert backend.alive()
    assert requests.get(f"{backend.url}/health", timeout=30).status_code == 200
    with open(backend.log_path, "rb") as log:
        log.seek(log_offset)
        new_log = log.read().decode(errors="replace")
    assert "Traceback" not in new_log and "WORKER TIMEOUT" not in new_log, new_log[-3000:]
    assert snapshot(backend) == before
    scraped = requests.get(f"{backend.url}/metrics", timeout=30)
    assert scraped.status_code == 200, scraped.text[:500]
    assert any(f.name == "rlhf_http_requests" for f in text_string_to_metric_families(scraped.text))


STORE_TABLES = ("label_configs", "projects", "annotations", "records", "jobs", "counters")


def stored_state(backend) -> tuple[Any, ...]:
    """What the store holds, in brief: row counts and the change counter (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{backend.db_path}?mode=ro", uri=True)) as db:
        counts = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in STORE_TABLES]
        return (*counts, db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone())


class Answer:
    """A response, and what the store held before and after the request."""

    def __init__(self, response: requests.Response, before: Any, after: Any) -> None:
        self.response, self.before, self.after = response, before, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.response, name)


def send(backend, method: str, path: str, body: Any = None, raw: Any = None, **kw: Any) -> Any:
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    # The webhook secret: these tests are about bodies, which must reach the parser.
    headers = {**WEBHOOK_HEADERS, **kw.pop("headers", {})}
    before = stored_state(backend)
    response = requests.request(
        method, f"{backend.url}{path}", data=data, headers=headers, timeout=120, **kw
    )
    return Answer(response, before, stored_state(backend))


def assert_clean(response: Any, allowed: set[int] | None = None) -> None:
    """No 5xx; an error is JSON {"error", "message"} and stored nothing; with ``allowed``, one
    of those statuses."""
    assert response.status_code < 500, response.text[:500]
    if allowed is not None:
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "message"}, body
        assert isinstance(body["error"], str) and isinstance(body["message"], str)
        assert body["message"]
        if isinstance(response, Answer):
            assert response.after == response.before, "a refused request changed the store"
    else:
        assert 200 <= response.status_code < 300


# -- hand-written cases, each with its exact status ---------------------------------------------


class webhook(dict):  # lower case: reads as a call in the table of cases
    """A valid ANNOTATION_CREATED for project 2 (registered from its label config), changed:
    ``webhook(annotation__id="7")`` sets ``body["annotation"]["id"]``; ``DELETE`` removes it."""

    def build(self, annotation_event: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        body = annotation_event(7, project_id=2)
        for dotted, value in self.items():
            target = body
            *parents, key = dotted.split("__")
            for parent in parents:
                target = target[parent]
            if value is DELETE:
                del target[key]
            else:
                target[key] = value
        return body


DELETE = object()
UNKNOWN_PROJECT = {"id": 424242}  # no label_config: never set up, cannot be registered
SENTIMENT = (
    '<View><Text name="text" value="$text"/><Choices name="c" toName="text">'
    '<Choice value="positive"/><Choice value="negative"/></Choices></View>'
)
UNSUPPORTED_CONFIGS = {
    "empty view": "<View/>",
    "not xml": "this is not a label config",
    "truncated xml": "<View><Text name='t' value='$t'/>",
    "only a text": "<View><Text name='t' value='$t'/></View>",
    "sentiment choices": SENTIMENT,
    "pairwise with one target": (
        '<View><Text name="p" value="$p"/><Pairwise name="c" toName="a"/>'
        '<Text name="a" value="$a"/></View>'
    ),
    "rating that is not a number": (
        '<View><Text name="p" value="$p"/><Text name="a" value="$a"/><Text name="b" value="$b"/>'
        '<Rating name="ra" toName="a" maxRating="many"/><Rating name="rb" toName="b"/></View>'
    ),
}
SETUP_OK = {"project": "5.1795430590", "schema": "<View/>"}  # schema replaced per case

CASES = [
    # bodies that are not a JSON object
    ("POST", "/webhook", b'{"action": "ANNOTATION_CREATED", ', 400, "truncated JSON"),
    ("POST", "/webhook", b'{"action": "\xff\xfe"}', 400, "invalid UTF-8 in a string"),
    ("POST", "/webhook", b"\xff\xfe\x00\xd8garbage", 400, "binary garbage"),
    ("POST", "/webhook", b"", 400, "empty body"),
    ("POST", "/webhook", b"[" * 15_000 + b"]" * 15_000, 400, "JSON nested 15000 deep"),
    ("POST", "/webhook", b"[]", 400, "JSON list"),
    ("POST", "/webhook", b'"ANNOTATION_CREATED"', 400, "JSON string"),
    ("POST", "/webhook", b"null", 400, "JSON null"),
    ("POST", "/webhook", b"42", 400, "JSON number"),
    ("POST", "/webhook", b"1e400", 400, "JSON number out of float range"),
    ("POST", "/webhook", b"9" * 5000, 400, "JSON integer with 5000 digits"),
    ("POST", "/webhook", b'{"action": NaN}', 400, "NaN action"),
    ("POST", "/setup", b"[1, 2]", 400, "setup: JSON list"),
    ("POST", "/setup", b"\xc3\x28", 400, "setup: invalid UTF-8"),
    ("POST", "/predict", b"null", 400, "predict: JSON null"),
    ("POST", "/predict", b"{", 400, "predict: truncated JSON"),
    # webhook: missing or wrong fields
    ("POST", "/webhook", {}, 400, "no action"),
    ("POST", "/webhook", {"action": 5}, 400, "action a number"),
    ("POST", "/webhook", {"action": ""}, 400, "action empty"),
    ("POST", "/webhook", webhook(annotation=DELETE), 400, "no annotation"),
    ("POST", "/webhook", webhook(annotation=[1]), 400, "annotation a list"),
    ("POST", "/webhook", webhook(annotation__id=DELETE), 400, "no annotation id"),
    ("POST", "/webhook", webhook(annotation__id="7"), 400, "annotation id a string"),
    ("POST", "/webhook", webhook(annotation__id=True), 400, "annotation id a bool"),
    ("POST", "/webhook", webhook(annotation__id=7.0), 400, "annotation id a float"),
    ("POST", "/webhook", webhook(annotation__id=-7), 400, "annotation id negative"),
    ("POST", "/webhook", webhook(annotation__id=2**63), 400, "annotation id over 64 bits"),
    ("POST", "/webhook", webhook(annotation__id=10**30), 400, "annotation id huge"),
    ("POST", "/webhook", webhook(annotation__result={}), 400, "result an object"),
    ("POST", "/webhook", webhook(annotation__result="left"), 400, "result a string"),
    ("POST", "/webhook", webhook(annotation__result=0), 400, "result zero"),
    ("POST", "/webhook", webhook(annotation__was_cancelled="false"), 400, "cancelled a str"),
    ("POST", "/webhook", webhook(annotation__updated_at=1700000000), 400, "time a number"),
    ("POST", "/webhook", webhook(annotation__updated_at="yesterday"), 400, "time not ISO"),
    ("POST", "/webhook", webhook(task=DELETE), 400, "no task"),
    ("POST", "/webhook", webhook(task="1"), 400, "task a string"),
    ("POST", "/webhook", webhook(task__data=DELETE), 400, "no task data"),
    ("POST", "/webhook", webhook(task__data=["hi"]), 400, "task data a list"),
    ("POST", "/webhook", webhook(task__data=None), 400, "task data null"),
    ("POST", "/webhook", webhook(project=DELETE), 400, "no project"),
    ("POST", "/webhook", webhook(project="2"), 400, "project a string"),
    ("POST", "/webhook", webhook(project__id="2"), 400, "project id a string"),
    ("POST", "/webhook", webhook(project__id=2.5), 400, "project id a float"),
    ("POST", "/webhook", webhook(project__label_config=5), 400, "label config a number"),
    ("POST", "/webhook", webhook(project=UNKNOWN_PROJECT), 404, "unknown project"),
    ("POST", "/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 2}}, 400, "no ids"),
    (
        "POST",
        "/webhook",
        {"action": "ANNOTATIONS_DELETED", "annotations": [1, 2], "project": {"id": 2}},
        400,
        "deleted ids not objects",
    ),
    (
        "POST",
        "/webhook",
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "1"}], "project": {"id": 2}},
        400,
        "deleted id a string",
    ),
    (
        "POST",
        "/webhook",
        {"action": "ANNOTATION_DELETED", "annotations": [{"id": 3}]},
        400,
        "delete without project",
    ),
    ("POST", "/webhook", {"action": "START_TRAINING"}, 400, "training without project"),
    ("POST", "/webhook", {"action": "START_TRAINING", "project": UNKNOWN_PROJECT}, 404, "train ?"),
    ("POST", "/webhook", {"action": "PROJECT_UPDATED", "project": UNKNOWN_PROJECT}, 404, "upd ?"),
    ("POST", "/webhook", {"action": "PROJECT_UPDATED", "project": [2]}, 400, "project a list"),
    # acceptable: answered 2xx
    ("POST", "/webhook", {"action": "SOMETHING_NEW", "x": [1]}, 200, "unknown action"),
    ("POST", "/webhook", webhook(annotation__result=None), 200, "result null: no result"),
    ("POST", "/webhook", webhook(task__id="1"), 200, "task id a string: not kept"),
    ("POST", "/webhook", webhook(annotation__result=[1, "x", None]), 200, "result junk items"),
    # /setup
    ("POST", "/setup", {"schema": SENTIMENT}, 400, "setup: no project"),
    ("POST", "/setup", {"project": "5.1"}, 400, "setup: no schema"),
    ("POST", "/setup", {"project": "5.1", "schema": 5}, 400, "setup: schema a number"),
    ("POST", "/setup", {"project": "abc", "schema": SENTIMENT}, 400, "setup: project not id"),
    ("POST", "/setup", {"project": "\u00b2.1", "schema": SENTIMENT}, 400, "setup: superscript"),
    ("POST", "/setup", {"project": "9" * 30, "schema": SENTIMENT}, 400, "setup: project huge"),
    ("POST", "/setup", {"project": True, "schema": SENTIMENT}, 400, "setup: project a bool"),
    ("POST", "/setup", {"project": "5.1", "schema": "<View/>", "hostname": 5}, 400, "host num"),
    *[
        ("POST", "/setup", {**SETUP_OK, "schema": xml}, 422, f"setup: {name}")
        for name, xml in UNSUPPORTED_CONFIGS.items()
    ],
    # /predict
    ("POST", "/predict", {}, 400, "predict: no tasks"),
    ("POST", "/predict", {"tasks": "1"}, 400, "predict: tasks a string"),
    ("POST", "/predict", {"tasks": [1, 2]}, 400, "predict: tasks not objects"),
    ("POST", "/predict", {"tasks": [{"id": 1}], "project": "abc"}, 400, "predict: bad project"),
    ("POST", "/predict", {"tasks": [{"id": 1}], "project": "424242.1"}, 404, "predict: unknown"),
    # unknown paths and wrong methods
    ("GET", "/nope", None, 404, "unknown path"),
    ("POST", "/webhook/", {"action": "X"}, 404, "trailing slash"),
    ("POST", "/api/webhook", {"action": "X"}, 404, "unknown post path"),
    ("GET", "/webhook", None, 405, "GET webhook"),
    ("GET", "/setup", None, 405, "GET setup"),
    ("PUT", "/predict", {"tasks": []}, 405, "PUT predict"),
    ("DELETE", "/webhook", None, 405, "DELETE webhook"),
    ("POST", "/health", {}, 405, "POST health"),
    ("POST", "/metrics", {}, 405, "POST metrics"),
    ("PATCH", "/", {}, 405, "PATCH index"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [pytest.param(*case[:4], id=case[4]) for case in CASES],
)
def test_hand_written_bad_request_gets_its_status(
    backend, annotation_event, method, path, body, status
):
    if isinstance(body, webhook):
        body = body.build(annotation_event)
    if isinstance(body, bytes):
        response = send(backend, method, path, raw=body)
    else:
        response = send(backend, method, path, body)
    assert_clean(response, {status})
    if status == 405:
        assert response.headers["Allow"]


@pytest.mark.parametrize("path", ["/webhook", "/setup", "/predict"])
def test_body_over_the_limit_gets_413(backend, path):
    padding = " " * MAX_BODY
    response = send(backend, "POST", path, raw=('{"action": "X"' + padding + "}").encode())
    assert_clean(response, {413})


def test_chunked_body_over_the_limit_gets_413(backend):
    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"action": "SOMETHING_NEW"'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b" " * 1024
        yield b"}"

    assert_clean(send(backend, "POST", "/webhook", raw=chunks()), {413})


def test_body_just_under_the_limit_is_accepted(backend, annotation_event):
    body = json.dumps(annotation_event(8, project_id=2))
    padded = body[:-1] + " " * (MAX_BODY - len(body) - 1) + "}"
    assert len(padded) == MAX_BODY - 1
    answer = send(backend, "POST", "/webhook", raw=padded.encode())
    assert_clean(answer, {200})
    assert answer.json()["status"] in {"stored", "stale"}


def test_get_endpoints_answer(backend):
    assert_clean(send(backend, "GET", "/health"), {200})
    metrics = send(backend, "GET", "/metrics")
    assert metrics.status_code == 200
    assert "rlhf_annotations_stored" in metrics.text


# -- hypothesis: anything at all, then mutations of real payloads -------------------------------

# Strings the fuzzing of issue 19 broke the backend with: lone UTF-16 surrogates (no UTF-8
# encoding exists for them), non-ASCII names, NUL, a long value.
HOSTILE_STRINGS = ["\ud800", "a\udfffb", "\udbff\ud800", "\u017f", "\x00", "\u202e", "X" * 3000]
texts = st.text(max_size=20) | st.sampled_from(HOSTILE_STRINGS)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
valid_ids = st.integers(min_value=1, max_value=10_000) | st.sampled_from([0, 2**63 - 1])
ids = valid_ids | st.sampled_from([-1, 2**63, 10**30])


@FUZZ
@given(
    path=st.sampled_from(["/webhook", "/setup", "/predict"]),
    body=json_values | st.dictionaries(texts, json_values, max_size=5),
)
def test_any_json_on_any_post_endpoint_is_answered_cleanly(backend, path, body):
    assume(not addresses_protected_data(body))
    assert_clean(send(backend, "POST", path, body))


@FUZZ
@given(path=st.sampled_from(["/webhook", "/setup", "/predict"]), raw=st.binary(max_size=300))
def test_any_bytes_on_any_post_endpoint_are_answered_cleanly(backend, path, raw):
    with contextlib.suppress(ValueError, RecursionError):  # most of them are not JSON
        assume(not addresses_protected_data(json.loads(raw)))
    assert_clean(send(backend, "POST", path, raw=raw))


@functools.lru_cache
def template(index: int) -> tuple[str, dict[str, Any], dict[str, list[Any]]]:
    """A label_configs/ template: its XML, a sample task's data, and value choices per key."""
    path = TEMPLATES[index]
    xml = path.read_text()
    data = json.loads(path.with_suffix("").with_suffix(".tasks.json").read_text())[0]["data"]
    schema = parse_label_config(xml)
    groups = {  # the value key Label Studio uses for each kind of control
        "selected": schema.pairwise,
        "ranker": schema.rankers,
        "rating": schema.ratings,
        "choices": schema.choices,
        "text": schema.feedback,
    }
    controls = [(c.name, key) for key, group in groups.items() for c in group]
    choices = [value for c in schema.choices for value in c.choice_to_index]
    buckets = [b for r in schema.rankers for b in r.buckets] + [
        r.items.name for r in schema.rankers
    ]
    item_ids = [
        i.get("id") for v in data.values() if isinstance(v, list) for i in v if isinstance(i, dict)
    ]
    return (
        xml,
        data,
        {"controls": controls, "choices": choices, "buckets": buckets, "items": item_ids},
    )


@st.composite
def annotation_results(draw, values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Result items for a template's controls, with values of right and wrong shapes."""
    pick = st.sampled_from
    value_of = {
        "selected": pick(["left", "right"]) | json_values,
        "choices": st.lists(pick(values["choices"] or ["x"]), max_size=2) | json_values,
        "ranker": st.dictionaries(
            pick(values["buckets"] or ["_"]),
            st.lists(pick(values["items"] or ["x"]) | json_scalars, max_size=3),
            max_size=3,
        )
        | st.lists(pick(values["items"] or ["x"]), max_size=3)
        | json_values,
        "rating": st.integers(min_value=-1, max_value=6) | json_values,
        "text": st.lists(st.text(max_size=10), max_size=2) | json_values,
    }
    items = []
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        # Mostly a real control with its own value key (so conversion runs on the value),
        # sometimes any name with any keys.
        name, key = draw(pick(values["controls"]))
        keys = [key]
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            name = draw(pick([name]) | st.text(max_size=6))
            keys = draw(st.lists(pick(sorted(value_of)), max_size=2, unique=True))
        items.append(
            {
                "from_name": name,
                "to_name": draw(st.text(max_size=6)),
                "type": draw(pick(["pairwise", "choices", "ranker", "rating", "textarea"])),
                "value": {key: draw(value_of[key]) for key in keys},
            }
        )
    return items


MUTABLE_PATHS = [
    ("action",),
    ("annotation",),
    ("annotation", "id"),
    ("annotation", "result"),
    ("annotation", "was_cancelled"),
    ("annotation", "updated_at"),
    ("annotation", "created_at"),
    ("annotation", "completed_by"),
    ("annotations",),
    ("task",),
    ("task", "id"),
    ("task", "data"),
    ("project",),  # a bare integer too: Label Studio's own payloads sometimes send one
    ("project", "id"),
    ("project", "label_config"),
]
ACTIONS = [
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "ANNOTATION_DELETED",
    "START_TRAINING",
    "PROJECT_UPDATED",
    "TASKS_CREATED",
]


@st.composite
def mutated_webhooks(
    draw, annotation_event: Callable[..., dict[str, Any]], envelope: bool = True
) -> dict[str, Any]:
    """A template project's ANNOTATION_* webhook with a fuzzed result; with ``envelope``, also
    any action, and up to three fields of the envelope removed or replaced."""
    index = draw(st.integers(min_value=0, max_value=len(TEMPLATES) - 1))
    xml, data, values = template(index)
    data = dict(data)
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=1 + envelope, unique=True)):
        data[key] = draw(json_values)
    action = st.sampled_from(ACTIONS if envelope else ACTIONS[:2])
    id_values = ids if envelope else valid_ids  # without envelope faults, every id is valid
    body = annotation_event(
        draw(id_values),
        action=draw(action),
        project_id=2 + index,
        task_id=draw(id_values),
        task_data=data,
        result=draw(annotation_results(values)),
        was_cancelled=envelope and draw(st.booleans()),
        updated_at=draw(st.sampled_from(["2026-11-23T10:43:12Z", "2026-11-23T10:43:12.5+02:00"])),
        label_config=xml,
    )
    if not envelope:
        return body
    if draw(st.booleans()):
        body["annotations"] = draw(st.lists(st.fixed_dictionaries({"id": ids}), max_size=3))
    for path in draw(st.lists(st.sampled_from(MUTABLE_PATHS), max_size=3, unique=True)):
        target = body
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = draw(json_values | ids)
    return body


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_mutated_label_studio_webhooks_are_answered_cleanly(backend, annotation_event, data):
    body = data.draw(mutated_webhooks(annotation_event))
    assume(not addresses_protected_data(body))
    response = send(backend, "POST", "/webhook", body)
    assert_clean(response, {200, 400, 404, 413, 422})
    if response.status_code == 200:
        assert response.json()["action"] == body["action"]


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_annotation_results_of_any_shape_are_stored_or_refused_cleanly(
    backend, annotation_event, data
):
    """Results that do not fit the label config are stored without records, never a 5xx."""
    body = data.draw(mutated_webhooks(annotation_event, envelope=False))
    assume(not addresses_protected_data(body))
    response = send(backend, "POST", "/webhook", body)
    assert_clean(response, {200})
    assert response.json()["status"] in {"stored", "stale"}


@settings(FUZZ, max_examples=60)
@given(
    project=json_values | st.from_regex(r"[0-9]{1,22}(\.[0-9]{1,12})?", fullmatch=True),
    schema=st.sampled_from([p.read_text() for p in TEMPLATES] + list(UNSUPPORTED_CONFIGS.values()))
    | json_values,
    hostname=st.none() | st.just("http://localhost:8080") | json_values,
    access_token=st.none() | st.text(max_size=12) | json_values,
)
def test_mutated_setup_is_answered_cleanly(backend, project, schema, hostname, access_token):
    body = {
        "project": project,
        "schema": schema,
        "hostname": hostname,
        "access_token": access_token,
    }
    assume(not addresses_protected_data(body))
    assert_clean(send(backend, "POST", "/setup", body), {200, 400, 413, 422})


@settings(FUZZ, max_examples=40)
@given(
    project=st.sampled_from(["2.1795430590", "424242.1"]) | json_values,
    tasks=st.lists(
        st.fixed_dictionaries(
            {"id": ids, "data": json_values},
            optional={"project": json_values},
        )
        | json_values,
        max_size=3,
    ),
    label_config=st.none() | st.sampled_from([p.read_text() for p in TEMPLATES]) | json_values,
)
def test_mutated_predict_is_answered_cleanly(backend, project, tasks, label_config):
    body = {"project": project, "tasks": tasks}
    if label_config is not None:
        body["label_config"] = label_config
    assume(not addresses_protected_data(body))
    assert_clean(send(backend, "POST", "/predict", body), {200, 400, 404, 413, 422})


# -- label configs: every template, mutated ------------------------------------------------------

XML_NAMES = st.sampled_from(["\u017f", "\u00e9t\u00e9", "data-x", "x.y", "_", "\u0391\u03b2"]) | (
    st.from_regex(r"[A-Za-z_\u00c0-\u024f][A-Za-z0-9_.\u00c0-\u024f-]{0,6}", fullmatch=True)
)
EXTRA_CONTROLS = [  # what the fuzzing of issue 19 combined: several preference controls at once
    '<List name="extra_list" value="$extra" title="More"/><Ranker name="extra_rank" '
    'toName="extra_list"/>',
    '<Ranker name="second_rank" toName="candidates"/>',
    '<Pairwise name="extra_pair" toName="answer1,answer2"/>',
    '<Rating name="extra_rating" toName="answer1"/>',
    '<Choices name="extra_tie" toName="prompt"><Choice value="Tie"/></Choices>',
    '<TextArea name="extra_notes" toName="answer2"/>',
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/>',
    "<!-- " + "padding " * 600 + "-->",  # over RLHF_MAX_LABEL_CONFIG_BYTES
]


@st.composite
def mutated_configs(draw) -> tuple[str, dict[str, Any]]:
    """A label_configs/ template, changed by up to three mutations, and its sample task data."""
    xml, data, _ = template(draw(st.integers(min_value=0, max_value=len(TEMPLATES) - 1)))
    data = {**data, "extra": [{"id": "e1", "body": "one"}, {"id": "e2", "body": "two"}]}
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["attribute", "control", "text", "truncate", "rename"]))
        at = xml.rfind("</View>") % (len(xml) + 1)  # the end when truncated away
        if kind == "attribute":
            name, value = draw(XML_NAMES), draw(texts).replace('"', "").replace("<", "")
            xml = xml.replace("<View", f'<View {name}="{value}"', 1)
        elif kind == "control":
            xml = xml[:at] + draw(st.sampled_from(EXTRA_CONTROLS)) + xml[at:]
        elif kind == "text":
            xml = xml[:at] + draw(texts).replace("<", "&lt;").replace("&", "&amp;") + xml[at:]
        elif kind == "truncate":
            xml = xml[: draw(st.integers(min_value=0, max_value=len(xml)))]
        else:
            xml = xml.replace('name="', f'name="{draw(XML_NAMES)}', 1)
    return xml, data


@settings(FUZZ, max_examples=100)
@given(config=mutated_configs(), project=st.integers(min_value=100, max_value=110))
def test_mutated_templates_on_every_endpoint_are_answered_cleanly(
    backend, annotation_event, config, project
):
    xml, data = config
    setup = {"project": f"{project}.1", "schema": xml, "hostname": "http://127.0.0.1:9"}
    assert_clean(send(backend, "POST", "/setup", setup), {200, 400, 413, 422})  # 400: empty
    predict = {"project": f"{project}.1", "label_config": xml, "tasks": [{"id": 1, "data": data}]}
    assert_clean(send(backend, "POST", "/predict", predict), {200, 404, 413, 422})
    event = annotation_event(project, project_id=project, task_data=data, label_config=xml)
    answer = send(backend, "POST", "/webhook", event)
    assert_clean(answer, {200, 404, 413, 422})  # 404: an empty config for an unknown project
    if answer.status_code == 200 and xml and "label_config" not in answer.json():
        # a config the webhook accepted is one /setup accepts (an empty one is no config)
        assert_clean(send(backend, "POST", "/setup", {**setup, "project": "999.1"}), {200})


@settings(FUZZ, max_examples=40)
@given(action=texts | st.sampled_from(ACTIONS))
def test_any_webhook_action_is_answered_and_metrics_keep_scraping(backend, action):
    """Every action string used to become a metric label: one lone surrogate broke /metrics."""
    assert_clean(send(backend, "POST", "/webhook", {"action": action}), {200, 400, 404})
    scraped = requests.get(f"{backend.url}/metrics", timeout=30)
    assert scraped.status_code == 200, scraped.text[:300]
    assert list(text_string_to_metric_families(scraped.text))


@settings(FUZZ, max_examples=40)
@given(
    template_index=st.integers(min_value=0, max_value=len(TEMPLATES) - 1),
    hostname=texts,
    access_token=texts,
)
def test_setup_with_any_hostname_and_token_is_answered_cleanly(
    backend, template_index, hostname, access_token
):
    body = {
        "project": "77.1",
        "schema": TEMPLATES[template_index].read_text(),
        "hostname": hostname,
        "access_token": access_token,
    }
    assert_clean(send(backend, "POST", "/setup", body), {200, 400})


@settings(FUZZ, max_examples=30)
@given(
    page=st.sampled_from(["/api/projects/{}/summary", "/dashboard/{}"]),
    project=st.integers(min_value=-10, max_value=2**70) | texts,
)
def test_dashboard_pages_of_any_project_are_answered_cleanly(backend, page, project):
    answer = requests.get(backend.url + page.format(project), timeout=60)
    assert answer.status_code < 500, answer.text[:300]


def addresses_protected_data(body: Any) -> bool:
    """Whether a (valid-looking) request could legitimately change the pre-stored annotations:
    it names their project, or one of their ids as an annotation."""
    if not isinstance(body, dict):
        return False
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else project
    try:
        if parse_project_id(project_id) == PROJECT:
            return True
    except BadRequest:
        pass
    annotations = body.get("annotations")
    listed = annotations if isinstance(annotations, list) else []
    listed = [*listed, body.get("annotation")]
    return any(isinstance(a, dict) and a.get("id") in PRESTORED for a in listed)
