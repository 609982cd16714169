"""Label Studio's webhooks replayed duplicated and out of order leave exactly its own state.

Label Studio retries deliveries and sends them from several workers, so the backend sees
duplicates and any order. A world of annotations is built from the captured 1.23.2 payloads:
created, updated several times (later ``updated_at`` each time), some skipped
(``was_cancelled``), some deleted (plural ``ANNOTATIONS_DELETED`` and singular
``ANNOTATION_DELETED``), plus ``START_TRAINING``, ``PROJECT_UPDATED`` and an action the backend
does not handle. What Label Studio holds at the end is computed from the world, independently of
the backend's conversion code; the store must equal it exactly after every replay.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from conftest import WEBHOOK_HEADERS

from rlhf_core.store import Store

SETUP = "01_setup"
PROJECT, OTHER_PROJECT = 1, 2  # OTHER_PROJECT is never set up: its events carry its label config
BASE_TIME = datetime(2026, 11, 23, 10, 43, 12, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Version:
    """One state of an annotation in Label Studio, as of ``updated_at``."""

    updated_at: datetime
    selected: str | None  # "left" / "right"; None when the annotation was skipped
    microseconds_in_text: bool = True  # Label Studio drops ".000000" from whole seconds


@dataclass
class Planned:
    annotation_id: int
    project_id: int
    task_id: int
    annotator: int
    task_data: dict[str, str]
    versions: list[Version] = field(default_factory=list)
    deleted: str | None = None  # "plural" or "singular"

    @property
    def final(self) -> Version:
        return max(self.versions, key=lambda v: v.updated_at)


def plan_world(n: int = 60, seed: int = 20261123) -> list[Planned]:
    """Annotations 101..100+n with 1-4 versions each; about 1 in 4 deleted, 1 in 6 ends skipped."""
    rng = random.Random(seed)
    world = []
    for i in range(n):
        annotation_id = 101 + i
        planned = Planned(
            annotation_id=annotation_id,
            project_id=OTHER_PROJECT if i % 5 == 0 else PROJECT,
            task_id=1000 + i // 2,  # two annotators per task
            annotator=1 + i % 2,
            task_data={
                "prompt": f"prompt {i // 2}",
                "answer1": f"answer A{i // 2}",
                "answer2": f"answer B{i // 2}",
            },
        )
        moment = BASE_TIME + timedelta(minutes=i)
        for v in range(rng.randint(1, 4)):
            skipped = (i % 6 == 0 and v == 0) or (i % 12 == 1 and v > 0)
            selected = None if skipped else rng.choice(["left", "right"])
            if i % 7 == 3 and v == 0:
                # created on a whole second (text without microseconds), updated 0.3 s later:
                # "…:12Z" sorts after "…:12.300000Z" as text, though it is earlier
                moment = moment.replace(microsecond=0)
                planned.versions.append(Version(moment, selected, microseconds_in_text=False))
                moment += timedelta(milliseconds=300)
                continue
            planned.versions.append(Version(moment, selected))
            moment += timedelta(seconds=rng.randint(1, 90), microseconds=rng.randint(1, 999_999))
        if rng.random() < 0.25:
            planned.deleted = rng.choice(["plural", "singular"])
        world.append(planned)
    return world


def ls_time(version: Version) -> str:
    text = version.updated_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return text if version.microseconds_in_text else text.replace(".000000Z", "Z")


def stored_time(version: Version) -> str:
    return version.updated_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pairwise_result(selected: str | None) -> list[dict[str, Any]]:
    if selected is None:
        return []
    return [
        {
            "from_name": "comparison",
            "to_name": "comparison",
            "type": "pairwise",
            "value": {"selected": selected},
        }
    ]


def world_events(
    world: list[Planned], annotation_event: Any, captured: Any
) -> list[tuple[str, dict[str, Any]]]:
    """Every webhook Label Studio sends for ``world``, each with a key saying what it is.

    Keys: ``create:<id>``, ``update:<id>:<n>``, ``delete:<id>,<id>,...``, or the action.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    for planned in world:
        for number, version in enumerate(planned.versions):
            key = (
                f"update:{planned.annotation_id}:{number}"
                if number
                else f"create:{planned.annotation_id}"
            )
            body = annotation_event(
                planned.annotation_id,
                action="ANNOTATION_UPDATED" if number else "ANNOTATION_CREATED",
                project_id=planned.project_id,
                task_id=planned.task_id,
                task_data=planned.task_data,
                result=pairwise_result(version.selected),
                was_cancelled=version.selected is None,
                completed_by=planned.annotator,
                updated_at=ls_time(version),
            )
            events.append((key, body))
    for project_id in (PROJECT, OTHER_PROJECT):
        plural = [p for p in world if p.deleted == "plural" and p.project_id == project_id]
        for start in range(0, len(plural), 3):  # bulk deletes of up to 3 annotations
            body = captured("07_webhook_annotations_deleted")
            body["project"]["id"] = project_id
            ids = [p.annotation_id for p in plural[start : start + 3]]
            body["annotations"] = [{"id": annotation_id} for annotation_id in ids]
            events.append(("delete:" + ",".join(map(str, ids)), body))
    for planned in (p for p in world if p.deleted == "singular"):
        body = captured("07_webhook_annotations_deleted")
        del body["annotations"]
        body["action"] = "ANNOTATION_DELETED"
        body["annotation"] = {"id": planned.annotation_id}
        body["project"]["id"] = planned.project_id
        events.append((f"delete:{planned.annotation_id}", body))
    start_training = captured("08_webhook_start_training")
    project_updated = captured("08_webhook_start_training")
    project_updated["action"] = "PROJECT_UPDATED"
    events += [
        ("START_TRAINING", start_training),
        ("PROJECT_UPDATED", project_updated),
        ("TASKS_CREATED", {"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 1}}),
    ]
    return events


def delivery(events: list[tuple[str, dict[str, Any]]], seed: int) -> list[tuple[str, dict]]:
    """What the backend receives: every event 1-3 times (retries), all shuffled."""
    rng = random.Random(seed)
    delivered = [event for event in events for _ in range(rng.randint(1, 3))]
    rng.shuffle(delivered)
    return delivered


# -- the state Label Studio holds ---------------------------------------------------------------


def expected_annotations(world: list[Planned]) -> dict[int, dict[str, Any]]:
    return {
        p.annotation_id: {
            "project_id": p.project_id,
            "task_id": p.task_id,
            "annotator": p.annotator,
            "task_data": p.task_data,
            "result": pairwise_result(p.final.selected),
            "was_cancelled": p.final.selected is None,
            "ls_updated_at": stored_time(p.final),
        }
        for p in world
        if p.deleted is None
    }


def expected_records(world: list[Planned]) -> dict[int, list[dict[str, Any]]]:
    """One preference per live, not skipped annotation: ``left`` prefers ``answer1``."""
    records = {}
    for p in world:
        if p.deleted is not None or p.final.selected is None:
            continue
        a, b = p.task_data["answer1"], p.task_data["answer2"]
        chosen, rejected = (a, b) if p.final.selected == "left" else (b, a)
        records[p.annotation_id] = [
            {
                "project": p.project_id,
                "task": p.task_id,
                "annotation": p.annotation_id,
                "annotator": p.annotator,
                "prompt": p.task_data["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "tie": False,
                "source": "pairwise",
                "control": "comparison",
            }
        ]
    return records


def stored_annotations(store: Store) -> dict[int, dict[str, Any]]:
    return {
        a.annotation_id: {
            "project_id": a.project_id,
            "task_id": a.task_id,
            "annotator": a.annotator,
            "task_data": a.task_data,
            "result": a.result,
            "was_cancelled": a.was_cancelled,
            "ls_updated_at": a.ls_updated_at,
        }
        for project_id in (PROJECT, OTHER_PROJECT)
        for a in store.annotations(project_id)
    }


def stored_records(store: Store) -> dict[int, list[dict[str, Any]]]:
    records: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for project_id in (PROJECT, OTHER_PROJECT):
        for record in store.records(project_id):
            records[record["annotation"]].append(record)
    return dict(records)


def tombstoned_ids(store: Store) -> set[int]:
    with sqlite3.connect(store.path) as conn:
        return {
            row[0] for row in conn.execute("SELECT annotation_id FROM annotations WHERE deleted")
        }


def assert_store_matches_world(store: Store, world: list[Planned], label_config: str) -> None:
    assert stored_annotations(store) == expected_annotations(world)
    assert stored_records(store) == expected_records(world)
    assert tombstoned_ids(store) == {p.annotation_id for p in world if p.deleted}
    assert store.project(PROJECT).label_config == label_config
    assert store.project(OTHER_PROJECT).label_config == label_config
    # START_TRAINING and the annotation count queue one job; later triggers coalesce into it.
    train_jobs = [(j.project_id, j.status) for j in store.jobs() if j.kind == "train"]
    assert train_jobs == [(PROJECT, "queued")]


def assert_delivery_is_adversarial(delivered: list[tuple[str, dict]]) -> None:
    """The shuffle really put updates before creates and deletes before creates."""
    first_seen: dict[str, int] = {}
    for position, (key, _) in enumerate(delivered):
        first_seen.setdefault(key, position)
    created = {k.split(":")[1]: v for k, v in first_seen.items() if k.startswith("create:")}
    update_first = [
        key
        for key, position in first_seen.items()
        if key.startswith("update:") and position < created[key.split(":")[1]]
    ]
    delete_first = [
        annotation_id
        for key, position in first_seen.items()
        if key.startswith("delete:")
        for annotation_id in key.split(":")[1].split(",")
        if position < created[annotation_id]
    ]
    assert update_first and delete_first
    assert max(Counter(key for key, _ in delivered).values()) > 1


EXPECTED_STATUS = {
    "ANNOTATION_CREATED": {"stored", "stale"},
    "ANNOTATION_UPDATED": {"stored", "stale"},
    "ANNOTATIONS_DELETED": {"deleted"},
    "ANNOTATION_DELETED": {"deleted"},
    "START_TRAINING": {"queued", "coalesced"},
    "PROJECT_UPDATED": {"updated"},
    "TASKS_CREATED": {"ignored"},
}


def assert_answer(status_code: int, answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert status_code == 200, answer
    assert answer["action"] == body["action"]
    assert answer["status"] in EXPECTED_STATUS[body["action"]], (answer, body["action"])


@pytest.fixture
def setup_body(captured) -> dict[str, Any]:
    body = captured(SETUP)
    del body["hostname"], body["access_token"]  # no Label Studio to call back in these tests
    return body


@pytest.fixture
def world() -> list[Planned]:
    return plan_world()


def test_world_covers_every_case(world):
    finals = [p.final for p in world if p.deleted is None]
    assert any(v.selected is None for v in finals)  # skipped, kept
    assert any(p.final.selected and p.versions[0].selected is None for p in world)  # unskipped
    assert {p.deleted for p in world} == {None, "plural", "singular"}
    assert any(len(p.versions) > 2 for p in world)
    assert any(not v.microseconds_in_text for p in world for v in p.versions[:1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shuffled_duplicated_replay_through_flask_equals_label_studio_state(
    seed, world, client, client_store, setup_body, annotation_event, captured
):
    assert client.post("/setup", json=setup_body).status_code == 200
    delivered = delivery(world_events(world, annotation_event, captured), seed)
    assert_delivery_is_adversarial(delivered)

    for _, body in delivered:
        response = client.post("/webhook", json=body)
        assert_answer(response.status_code, response.get_json(), body)

    assert_store_matches_world(client_store, world, setup_body["schema"])


@pytest.mark.slow
def test_concurrent_replay_through_gunicorn_equals_label_studio_state(
    world, server, setup_body, annotation_event, captured
):
    assert requests.post(f"{server.url}/setup", json=setup_body, timeout=30).status_code == 200
    delivered = delivery(world_events(world, annotation_event, captured), seed=99)
    assert_delivery_is_adversarial(delivered)
    failures: list[str] = []

    def send(share: list[tuple[str, dict]]) -> None:
        with requests.Session() as session:
            for _, body in share:
                try:
                    response = session.post(
                        f"{server.url}/webhook", json=body, headers=WEBHOOK_HEADERS, timeout=30
                    )
                    assert_answer(response.status_code, response.json(), body)
                except (requests.RequestException, AssertionError, ValueError) as exc:
                    failures.append(f"{body['action']}: {exc!r}")

    threads = [threading.Thread(target=send, args=(delivered[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []

    assert_store_matches_world(server.store(), world, setup_body["schema"])


def test_update_delivered_before_create_keeps_the_update(client, client_store, annotation_event):
    update = annotation_event(
        7, action="ANNOTATION_UPDATED", selected="left", updated_at="2026-11-23T10:45:00.000001Z"
    )
    create = annotation_event(7, selected="right", updated_at="2026-11-23T10:44:00.000001Z")
    assert client.post("/webhook", json=update).get_json()["status"] == "stored"
    assert client.post("/webhook", json=create).get_json()["status"] == "stale"
    [stored] = client_store.annotations(1)
    assert stored.result[0]["value"] == {"selected": "left"}
    assert [r["chosen"] for r in client_store.records(1)] == ["hello"]


def test_timestamps_compare_as_time_not_as_text(client, client_store, annotation_event):
    # Label Studio writes a whole second without microseconds: "…:12Z" > "…:12.300000Z" as text.
    create = annotation_event(8, selected="right", updated_at="2026-11-23T10:43:12Z")
    update = annotation_event(
        8, action="ANNOTATION_UPDATED", selected="left", updated_at="2026-11-23T10:43:12.300000Z"
    )
    offset = annotation_event(  # the same instant as the update, written with an offset
        8, action="ANNOTATION_UPDATED", selected="left", updated_at="2026-11-23T12:43:12.3+02:00"
    )
    assert client.post("/webhook", json=update).get_json()["status"] == "stored"
    assert client.post("/webhook", json=create).get_json()["status"] == "stale"
    assert client.post("/webhook", json=offset).get_json()["status"] == "stored"
    [stored] = client_store.annotations(1)
    assert stored.result[0]["value"] == {"selected": "left"}
    assert stored.ls_updated_at == "2026-11-23T10:43:12.300000Z"


def test_delete_delivered_before_create_stays_deleted(
    client, client_store, annotation_event, captured
):
    delete = captured("07_webhook_annotations_deleted")
    delete["annotations"] = [{"id": 9}]
    assert client.post("/webhook", json=delete).get_json()["status"] == "deleted"
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        answer = client.post("/webhook", json=annotation_event(9, action=action)).get_json()
        assert answer["status"] == "stale"
    assert client_store.annotations(1) == []
    assert client_store.records(1) == []


def test_cancelled_annotation_is_stored_without_training_records(
    client, client_store, annotation_event
):
    skipped = annotation_event(10, result=[], was_cancelled=True)
    answer = client.post("/webhook", json=skipped).get_json()
    assert answer == {
        "action": "ANNOTATION_CREATED",
        "status": "stored",
        "annotation": 10,
        "records": 0,
    }
    [stored] = client_store.annotations(1)
    assert (stored.annotation_id, stored.was_cancelled, stored.kinds) == (10, True, ())
    assert client_store.records(1) == []
