"""Real servers on loopback for end-to-end tests: Label Studio 1.23.2 and ``rlhf-backend serve``.

Label Studio comes from ``$LABEL_STUDIO_BIN`` when set, otherwise from ``<repo>/.venv-ls``, which
is created on first use (``pip install label-studio==1.23.2``) under a file lock so that parallel
runs do not race. Every server runs in its own process group and ``stop()`` ends the whole group.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from label_studio_sdk.client import LabelStudio

from rlhf_core.credentials import WEBHOOK_SECRET_HEADER
from rlhf_core.store import Store

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VERSION = "1.23.2"
LS_VENV = REPO / ".venv-ls"
# Kept between runs: a migrated empty Label Studio database per Label Studio install.
E2E_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf-backend-e2e"
# Limits measured on 2 cores shared with other work (load 8): a first migration took 940 s,
# a boot on a migrated database 72 s. On an idle machine each is several times faster.
INSTALL_TIMEOUT_S = 900.0
MIGRATE_TIMEOUT_S = 1800.0
LS_BOOT_TIMEOUT_S = 400.0  # on an already migrated database
LS_PREDICT_TIMEOUT_S = 400  # Label Studio's own wait for /predict (its default: 100 s)
LS_API_TIMEOUT_S = LS_PREDICT_TIMEOUT_S + 200  # a call to Label Studio may wait on /predict
BACKEND_BOOT_TIMEOUT_S = 300.0  # workers import torch and label-studio-sdk: 27-97 s at load 6-10
# What the first test may spend in session fixtures before its own body runs.
SESSION_SETUP_BUDGET_S = (
    INSTALL_TIMEOUT_S + MIGRATE_TIMEOUT_S + LS_BOOT_TIMEOUT_S + 2 * BACKEND_BOOT_TIMEOUT_S
)
LS_USER = "e2e@example.com"

INLINE_PAIRWISE_CONFIG = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Pairwise name="comparison" toName="answer1,answer2"/>'
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>'
)
PAIRWISE_TASKS = [
    {"prompt": "Name a prime number.", "answer1": "7", "answer2": "8"},
    {"prompt": "Capital of France?", "answer1": "Lyon", "answer2": "Paris"},
    {"prompt": "2 + 2 =", "answer1": "4", "answer2": "5"},
]


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server started in its own process group, its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self, url: str, timeout_s: float) -> float:
        """Poll ``url`` until it answers 200; return the seconds it took.

        On any failure, a pytest-timeout or Ctrl-C included, the server is stopped first.
        """
        try:
            return self._poll_health(url, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _poll_health(self, url: str, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was healthy:\n"
                    + self.log_tail()
                )
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"{self.name} not healthy at {url} after {timeout_s:.0f} s:\n" + self.log_tail()
        )

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after 45 s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=45)  # gunicorn waits up to 30 s for its workers
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus settings that would leak into the servers under test."""
    leaking = ("LABEL_STUDIO_", "HEARTEX_", "RLHF_", "BASIC_AUTH_", "DJANGO_", "PROMETHEUS_")
    # Label Studio also reads these bare names (get_env tries LABEL_STUDIO_X, HEARTEX_X, X).
    bare = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "BASE_DATA_DIR"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaking) and k not in bare}
    env.update(extra)
    return env


# -- Label Studio ----------------------------------------------------------------------------


def label_studio_binary() -> Path:
    """``$LABEL_STUDIO_BIN`` (``make test`` sets it), else ``<repo>/.venv-ls``, installed once."""
    configured = os.environ.get("LABEL_STUDIO_BIN")
    if configured:
        return Path(configured).absolute()  # the servers run in other directories
    binary = LS_VENV / "bin" / "label-studio"
    with (REPO / ".venv-ls.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run waits here until the install is done
        if not binary.exists():
            # The same commands as the Makefile's: uv resolves Label Studio's pins in about
            # 90 s where pip backtracks for more than 15 minutes.
            uv = Path(sys.executable).with_name("uv")
            subprocess.run([str(uv), "venv", "-q", str(LS_VENV)], check=True)
            subprocess.run(
                [
                    str(uv),
                    "pip",
                    "install",
                    "-q",
                    "--python",
                    str(LS_VENV / "bin" / "python"),
                    f"label-studio=={LABEL_STUDIO_VERSION}",
                ],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
            )
    return binary


@dataclass
class LabelStudioServer:
    url: str
    token: str  # the default user's legacy API token
    process: ServerProcess
    boot_s: float

    def client(self) -> LabelStudio:
        return LabelStudio(base_url=self.url, api_key=self.token, timeout=LS_API_TIMEOUT_S)

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A plain REST call, for endpoints whose raw answer a test wants to see."""
        headers = {"Authorization": f"Token {self.token}"}
        return requests.request(
            method, self.url + path, headers=headers, timeout=LS_API_TIMEOUT_S, **kwargs
        )


LS_DB = "label_studio.sqlite3"


def _label_studio_env(
    data_dir: Path, predict_timeout_s: float = LS_PREDICT_TIMEOUT_S, **extra: str
) -> dict[str, str]:
    return _clean_env(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        # The backend lives on loopback, which Label Studio refuses to call by default.
        ML_BLOCK_LOCAL_IP="false",
        USE_DEFAULT_BANNED_SUBNETS="false",
        SSRF_PROTECTION_ENABLED="false",
        # Label Studio waits 1 s for /health and for each webhook, 3 s for /setup and 100 s for
        # /predict. On a shared 2-core runner (load 8-12) our first answers took longer, so the
        # connection was marked Disconnected and a /predict that loads the model was dropped.
        # These tests prove the protocol and the data; latency is measured by bench/.
        ML_TIMEOUT_HEALTH="15",
        ML_TIMEOUT_SETUP="30",
        WEBHOOK_TIMEOUT="15",
        ML_TIMEOUT_PREDICT=str(predict_timeout_s),
        # Nothing leaves the machine.
        COLLECT_ANALYTICS="false",
        LATEST_VERSION_CHECK="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        **extra,
    )


def migrated_database(binary: Path, cache_dir: Path) -> Path:
    """An empty Label Studio database with every migration applied, made once per install.

    A first boot spends minutes in Django migrations; a session starts from a copy of this file
    instead (Label Studio then finds nothing to migrate). ``reset_password`` for a user who does
    not exist is the one ``label-studio`` command that migrates and then exits without a server.
    """
    key = hashlib.sha256(f"{binary.resolve()}:{binary.stat().st_mtime_ns}".encode()).hexdigest()
    template = cache_dir / f"label-studio-db-{key[:16]}"
    database = template / LS_DB
    template.mkdir(parents=True, exist_ok=True)
    with (template / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            work = Path(tempfile.mkdtemp(dir=template))
            argv = [str(binary), "reset_password", "--username", "nobody@invalid"]
            argv += ["--password", "unused", "--data-dir", str(work)]
            subprocess.run(
                argv,
                env=_label_studio_env(work),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                check=True,
                timeout=MIGRATE_TIMEOUT_S,
            )
            (work / LS_DB).replace(database)  # atomic: a half-migrated file is never used
            shutil.rmtree(work, ignore_errors=True)
    return database


def start_label_studio(
    binary: Path,
    data_dir: Path,
    database: Path | None = None,
    predict_timeout_s: float = LS_PREDICT_TIMEOUT_S,
) -> LabelStudioServer:
    """Label Studio on a fresh data dir, seeded with ``database`` (migrated, empty) if given;
    ``predict_timeout_s``: how long it waits for /predict (Label Studio's own default: 100)."""
    if database is not None:
        shutil.copyfile(database, data_dir / LS_DB)
    port = free_port()
    token = secrets.token_hex(20)  # Label Studio's token column holds 40 characters
    env = _label_studio_env(
        data_dir,
        predict_timeout_s,
        LABEL_STUDIO_USERNAME=LS_USER,
        LABEL_STUDIO_PASSWORD=secrets.token_urlsafe(16),
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
    )
    argv = [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1"]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    process = ServerProcess("Label Studio", argv, env, data_dir / "label-studio.log")
    url = f"http://127.0.0.1:{port}"
    timeout_s = LS_BOOT_TIMEOUT_S if database is not None else LS_BOOT_TIMEOUT_S + MIGRATE_TIMEOUT_S
    boot_s = process.wait_healthy(url + "/health", timeout_s)
    return LabelStudioServer(url, token, process, boot_s)


# -- the backend under test ------------------------------------------------------------------


@dataclass
class Backend:
    url: str
    process: ServerProcess
    store: Store  # read directly: SQLite in WAL mode is safe to read while the server writes
    auth: tuple[str, str] | None = None


def start_backend(data_dir: Path, auth: tuple[str, str] | None = None, **settings: str) -> Backend:
    """``rlhf-backend serve`` as a user starts it (real gunicorn), on a free loopback port;
    ``settings`` are extra environment variables (``RLHF_TRAIN_EVERY="4"``)."""
    port = free_port()
    script = Path(sys.executable).parent / "rlhf-backend"  # the console script pip installed
    argv = [str(script), "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    env = _clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **settings)
    if auth is not None:
        env.update(BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1])
    log_path = data_dir.parent / f"{data_dir.name}.log"
    process = ServerProcess("rlhf-backend", argv, env, log_path)
    url = f"http://127.0.0.1:{port}"
    process.wait_healthy(url + "/health", BACKEND_BOOT_TIMEOUT_S)
    return Backend(url, process, Store(data_dir / "store.sqlite3"), auth)


# -- projects and polling --------------------------------------------------------------------


@dataclass
class Project:
    id: int
    task_ids: list[int]
    label_config: str  # as Label Studio holds it
    task_data: dict[int, dict[str, Any]]


def pairwise_config() -> str:
    """The shipped template when there is one, else the same config inline."""
    template = REPO / "label_configs" / "pairwise.xml"
    return template.read_text() if template.exists() else INLINE_PAIRWISE_CONFIG


def create_project(
    ls: LabelStudio, title: str, tasks: list[dict[str, Any]], label_config: str | None = None
) -> Project:
    """A project with ``label_config`` (default: pairwise) and ``tasks`` imported."""
    label_config = label_config or pairwise_config()
    project = ls.projects.create(title=title[:50], label_config=label_config)
    assert project.id is not None
    ls.projects.import_tasks(id=project.id, request=tasks)
    # Listed before any ML backend is connected: opening one task (GET /api/tasks/ID) would
    # make Label Studio call the backend's /predict, synchronously, for a task without predictions.
    task_data = {task.id: dict(task.data) for task in ls.tasks.list(project=project.id)}
    stored_config = ls.projects.get(id=project.id).label_config  # Label Studio strips the XML
    assert stored_config is not None
    return Project(project.id, sorted(task_data), stored_config, task_data)


def connect(
    label_studio: LabelStudioServer, project_id: int, backend: Backend, **auth: Any
) -> dict[str, Any]:
    """Connect ``backend`` as the *Connect Model* dialog does; return Label Studio's ML row.

    Returns once the backend has put its webhook secret on the project's webhook: annotation
    events before that are refused (README: Security), as they would be for a user who
    annotates within the first second or two."""
    body = {"project": project_id, "url": backend.url, "title": "rlhf", **auth}
    response = label_studio.api("POST", "/api/ml", json=body)
    assert response.status_code == 201, response.text
    ls = label_studio.client()
    wait_for(
        lambda: [
            hook
            for hook in ls.webhooks.list(project=str(project_id))
            if hook.project == project_id and WEBHOOK_SECRET_HEADER in (hook.headers or {})
        ],
        timeout_s=60,
        what="the backend to put its secret header on the project's webhook",
    )
    return dict(response.json())


def wait_for(
    probe: Callable[[], Any],
    timeout_s: float = 30.0,
    what: str | Callable[[], str] = "condition",
    interval_s: float = 0.2,
) -> Any:
    """Call ``probe`` until it returns something truthy, and return that; fail on timeout."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not value:
        if time.monotonic() > deadline:
            description = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {description}")
        time.sleep(interval_s)
        value = probe()
    return value
