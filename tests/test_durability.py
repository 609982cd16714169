"""An acknowledged webhook survives ``kill -9`` of the whole server.

Label Studio does not deliver a webhook again once it got a 2xx, so every annotation the backend
acknowledged must be in the store after a crash. A real server (gunicorn master and 2 workers)
takes a burst of distinct ``ANNOTATION_CREATED`` webhooks from several threads and is killed with
SIGKILL, master and workers together, in the middle of it; a new server on the same data dir must
hold every acknowledged annotation with its training record.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from conftest import WEBHOOK_HEADERS

PROJECT = 1
MAX_REQUESTS = 2000  # the burst is cut short by the kill
SENDERS = 8
KILL_AFTER_ACKS = 30  # low enough to be reached on a loaded 2-core machine
BURST_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


def selected_for(annotation_id: int) -> str:
    return "left" if annotation_id % 2 else "right"


@dataclass
class Burst:
    """Webhooks sent by several threads; which ids were sent, which acknowledged (2xx)."""

    url: str
    annotation_event: Callable[..., dict[str, Any]]
    next_id: Iterator[int] = field(default_factory=lambda: iter(range(1, MAX_REQUESTS + 1)))
    sent: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)  # non-2xx answers: there must be none
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self) -> None:
        deadline = time.monotonic() + BURST_TIMEOUT_S
        with requests.Session() as session:
            while not self.stop.is_set() and time.monotonic() < deadline:
                with self.lock:
                    annotation_id = next(self.next_id, None)
                    if annotation_id is None:
                        return
                    self.sent.add(annotation_id)
                body = self.annotation_event(
                    annotation_id, task_id=annotation_id, selected=selected_for(annotation_id)
                )
                try:
                    response = session.post(
                        f"{self.url}/webhook", json=body, headers=WEBHOOK_HEADERS, timeout=10
                    )
                except requests.RequestException:
                    continue  # the server is gone (or going): no answer, no promise
                with self.lock:
                    if 200 <= response.status_code < 300:
                        self.acked.add(annotation_id)
                    else:
                        self.refused.append(f"{annotation_id}: {response.status_code}")

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


def wait_until_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """True once no process of the group is left (orphaned workers reaped by init)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_every_acknowledged_annotation_survives_kill_9(
    server_factory, tmp_path, captured, annotation_event
):
    data_dir = tmp_path / "data"
    server = server_factory(data_dir=data_dir, workers=2)
    setup = captured("01_setup")
    del setup["hostname"], setup["access_token"]
    assert requests.post(f"{server.url}/setup", json=setup, timeout=30).status_code == 200

    burst = Burst(server.url, annotation_event)
    senders = [threading.Thread(target=burst.send) for _ in range(SENDERS)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + BURST_TIMEOUT_S
    while burst.acked_count() < KILL_AFTER_ACKS and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL to master and workers at once, mid-burst
    burst.stop.set()
    for sender in senders:
        sender.join(timeout=30)

    assert not any(sender.is_alive() for sender in senders)
    assert server.process.returncode == -signal.SIGKILL
    assert wait_until_gone(server.process.pid), "a gunicorn worker outlived kill -9"
    assert burst.refused == []
    assert KILL_AFTER_ACKS <= len(burst.acked) < MAX_REQUESTS, "the kill did not hit the burst"

    restarted = server_factory(data_dir=data_dir, workers=2)
    store = restarted.store()
    stored = {a.annotation_id: a for a in store.annotations(PROJECT)}
    missing = burst.acked - stored.keys()
    assert not missing, f"{len(missing)} acknowledged annotations lost, e.g. {sorted(missing)[:5]}"
    assert stored.keys() <= burst.sent  # nothing invented; committed-but-unanswered may be there
    for annotation_id, annotation in stored.items():
        assert annotation.result[0]["value"] == {"selected": selected_for(annotation_id)}
        assert annotation.kinds == ("preference",)
    records = {r["annotation"]: r for r in store.records(PROJECT, "preference")}
    assert sorted(records) == sorted(stored)  # exactly one record per stored annotation
    for annotation_id, record in records.items():
        expected = "hello" if selected_for(annotation_id) == "left" else "go away"
        assert (record["task"], record["chosen"]) == (annotation_id, expected)
    with sqlite3.connect(restarted.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    # The restarted server takes new annotations on the recovered store.
    after = annotation_event(MAX_REQUESTS + 1, task_id=MAX_REQUESTS + 1)
    answer = requests.post(
        f"{restarted.url}/webhook", json=after, headers=WEBHOOK_HEADERS, timeout=30
    )
    assert answer.json()["status"] == "stored"
    assert MAX_REQUESTS + 1 in {a.annotation_id for a in store.annotations(PROJECT)}


@pytest.mark.parametrize(("setting", "pragma"), [("normal", 1), ("full", 2)])
def test_store_sync_setting_reaches_sqlite(tmp_path, setting, pragma):
    from ml_backend.app import create_app
    from rlhf_core.config import BackendConfig

    app = create_app(BackendConfig(data_dir=tmp_path, store_sync=setting))
    store = app.extensions["rlhf"].store
    with store.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == pragma
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
