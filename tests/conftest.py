"""Shared fixtures: the Flask app on a temporary data dir, and real `rlhf-backend serve` servers.

``client`` is a Flask test client (fast, in-process). ``server`` starts the real thing: the
``rlhf-backend serve`` console script (gunicorn master + workers) in its own process group on a
free loopback port, with a temporary data dir, and waits for ``/health``; the embedded job worker
is off unless ``env={"RLHF_EMBEDDED_WORKER": "1"}`` asks for it. ``server_factory``
starts more of them (other env, same data dir after a crash); every server a test started is
stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Nothing in the tests may reach a model hub: set before transformers or datasets are imported.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"

import pytest
import requests
from flask.testing import FlaskClient

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig
from rlhf_core.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
# Tests post webhooks directly, as an operator who manages webhooks by hand would: every backend
# they start accepts this RLHF_WEBHOOK_SECRET, sent in WEBHOOK_HEADERS.
TEST_WEBHOOK_SECRET = "test-webhook-secret-0123456789"
WEBHOOK_HEADERS = {"X-RLHF-Webhook-Secret": TEST_WEBHOOK_SECRET}
STARTUP_TIMEOUT_S = 300.0  # workers import label-studio-sdk and torch: minutes on a busy 2-core box


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command() -> list[str]:
    script = Path(sys.executable).parent / "rlhf-backend"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "rlhf_cli.main", "serve"]


class BackendServer:
    """A running `rlhf-backend serve` (gunicorn master and workers in one process group)."""

    def __init__(self, data_dir: Path, port: int, workers: int, env: dict[str, str]) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.data_dir / f"server-{port}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "LOG_LEVEL": "WARNING",
            # No job worker beside gunicorn unless a test asks for one: queued jobs stay as
            # intake left them, and no training competes for the CPU with the requests.
            "RLHF_EMBEDDED_WORKER": "0",
            "RLHF_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
            **env,
        }
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        argv = [
            *_serve_command(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--data-dir",
            str(self.data_dir),
        ]
        with open(self.log_path, "ab") as log:
            # A session of its own: the process group id is the master's pid, so os.killpg
            # reaches master and workers together (kill -9 of the whole server).
            self.process = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "store.sqlite3"

    def store(self) -> Store:
        """A store connection of this process, for reading what the server committed."""
        return Store(self.db_path)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or workers still importing
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL master and workers at once: no graceful shutdown, nothing flushed."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._signal_group(signal.SIGKILL)  # any worker the master left behind

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


@contextlib.contextmanager
def redis_server(workdir: Path, password: str | None = None) -> Iterator[str]:
    """A real ``redis-server`` on a free loopback port; yields its URL (with the password).

    Skips the test when the server is not installed, except where ``RLHF_REQUIRE_REDIS=1`` (CI).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("RLHF_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from redis import Redis

    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--requirepass", password] if password else []
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(argv, cwd=workdir, stdout=quiet, stderr=quiet)
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            Redis.from_url(url).ping()
            break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


ServerFactory = Callable[..., BackendServer]


def _make_factory(base_dir: Path, started: list[BackendServer]) -> ServerFactory:
    def start(
        data_dir: Path | None = None, workers: int = 2, env: dict[str, str] | None = None
    ) -> BackendServer:
        data_dir = data_dir or base_dir / f"server-{len(started)}"
        server = BackendServer(data_dir, free_port(), workers, env or {})
        started.append(server)
        server.wait_healthy()
        return server

    return start


def _stop_all(started: list[BackendServer]) -> None:
    for server in started:
        server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``start(data_dir=None, workers=2, env=None)``: a healthy server; all stopped at teardown."""
    started: list[BackendServer] = []
    yield _make_factory(tmp_path, started)
    _stop_all(started)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``server_factory``, for servers shared by the tests of one module."""
    started: list[BackendServer] = []
    yield _make_factory(tmp_path_factory.mktemp("servers"), started)
    _stop_all(started)


@pytest.fixture
def server(server_factory: ServerFactory) -> BackendServer:
    """A real `rlhf-backend serve` with 2 gunicorn workers on a temporary data dir."""
    return server_factory()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT encoder (rlhf_core/tiny.py) as the reward-model backbone, built once."""
    from rlhf_core.tiny import ensure_tiny_encoder

    return str(ensure_tiny_encoder(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture
def app_config(tmp_path: Path) -> BackendConfig:
    return BackendConfig(data_dir=tmp_path, webhook_secret=TEST_WEBHOOK_SECRET)


def webhook_client(config: BackendConfig) -> FlaskClient:
    """A Flask test client of ``create_app(config)`` that sends ``WEBHOOK_HEADERS``."""
    client = create_app(config).test_client()
    client.environ_base["HTTP_X_RLHF_WEBHOOK_SECRET"] = TEST_WEBHOOK_SECRET
    return client


@pytest.fixture
def client(app_config: BackendConfig) -> FlaskClient:
    """A Flask test client of the app on ``tmp_path``, sending ``WEBHOOK_HEADERS``."""
    return webhook_client(app_config)


@pytest.fixture
def client_store(client: FlaskClient) -> Store:
    """The store behind ``client``."""
    return client.application.extensions["rlhf"].store


# -- captured Label Studio payloads ------------------------------------------------------------


def captured_body(name: str) -> dict[str, Any]:
    """A fresh copy of a captured request body (``tests/fixtures/<name>.json``)."""
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


def annotation_event(
    annotation_id: int,
    *,
    action: str = "ANNOTATION_CREATED",
    project_id: int = 1,
    task_id: int = 1,
    task_data: dict[str, Any] | None = None,
    result: list[dict[str, Any]] | None = None,
    selected: str = "right",
    was_cancelled: bool = False,
    completed_by: int = 1,
    updated_at: str = "2026-11-23T10:43:12.926390Z",
    label_config: str | None = None,
) -> dict[str, Any]:
    """The captured ANNOTATION_CREATED webhook, re-addressed: another annotation, task, project.

    ``result`` defaults to the captured Pairwise choice with ``selected``; the project carries
    the captured label config unless ``label_config`` is given.
    """
    body = captured_body("05_webhook_annotation_created")
    body["action"] = action
    annotation = body["annotation"]
    annotation.update(
        id=annotation_id,
        task=task_id,
        project=project_id,
        completed_by=completed_by,
        updated_by=completed_by,
        was_cancelled=was_cancelled,
        updated_at=updated_at,
    )
    if result is None:
        result = annotation["result"]
        result[0]["value"]["selected"] = selected
    annotation["result"] = result
    body["project"]["id"] = project_id
    if label_config is not None:
        body["project"]["label_config"] = label_config
    body["task"].update(id=task_id, project=project_id)
    if task_data is not None:
        body["task"]["data"] = task_data
    return body


@pytest.fixture(scope="session")
def captured() -> Callable[[str], dict[str, Any]]:
    """``captured("05_webhook_annotation_created")``: a fresh copy of a captured request body."""
    return captured_body


@pytest.fixture(name="annotation_event", scope="session")
def annotation_event_fixture() -> Callable[..., dict[str, Any]]:
    """Builds ANNOTATION_CREATED/UPDATED webhooks from the capture (see ``annotation_event``)."""
    return annotation_event


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests last: their Label Studio and backends (with embedded workers that may
    still be training) stay up until the session ends, and would slow every test after them."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


# -- databases: SQLite and a real PostgreSQL ---------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (tests/postgres.py); skipped where it is not
    installed, except in CI (CI=true or RLHF_REQUIRE_POSTGRES=1), where that fails."""
    from postgres import PostgresServer, require_binaries

    server = PostgresServer(require_binaries(), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of this test: a SQLite file in ``tmp_path``, or a database
    of its own on the session's PostgreSQL server."""
    from rlhf_core.db import Database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres").create_database()
    yield url
    Database(url).dispose()


@pytest.fixture
def db_config(tmp_path: Path, database_url: str) -> BackendConfig:
    """``app_config`` on the database of ``database_url`` (both backends)."""
    return BackendConfig(
        data_dir=tmp_path, webhook_secret=TEST_WEBHOOK_SECRET, database_url=database_url
    )
