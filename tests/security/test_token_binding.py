"""Attack 1: a /setup naming another host must not send the project's token there.

Also: the token is never on disk in plaintext (store, WAL, key file), stores written by earlier
versions are encrypted on open, and LABEL_STUDIO_API_KEY goes only to LABEL_STUDIO_URL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import captured_body
from fake_label_studio import FakeLabelStudio

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig, ConfigError
from rlhf_core.store import Store

TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy Label Studio token's shape
PROJECT = 5


@pytest.fixture
def own_host():
    with FakeLabelStudio(projects=[PROJECT]) as fake:
        yield fake


@pytest.fixture
def other_host():
    with FakeLabelStudio(projects=[PROJECT]) as fake:
        yield fake


def setup_body(hostname: str | None, token: str | None) -> dict:
    body = captured_body("01_setup")
    body["project"] = f"{PROJECT}.1795430590"
    body["hostname"], body["access_token"] = hostname, token
    return body


def preannotate(data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "RLHF_SECRET_KEY"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "rlhf_cli.main", "preannotate", "--project", str(PROJECT)]
    argv += ["--data-dir", str(data_dir)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_setup_naming_another_host_never_sends_it_the_token(tmp_path, own_host, other_host):
    http = create_app(BackendConfig(data_dir=tmp_path)).test_client()
    assert http.post("/setup", json=setup_body(own_host.url, TOKEN)).status_code == 200
    # Anyone who can reach the backend: the same project, another host, no token.
    assert http.post("/setup", json=setup_body(other_host.url, None)).status_code == 200

    done = preannotate(tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(TOKEN in auth for auth in other_host.authorizations())
    assert f"Token {TOKEN}" in own_host.authorizations()  # the job still reaches its own host
    assert any(s.method == "PATCH" for s in own_host.seen)  # and it set the model version there


def test_a_token_without_a_host_is_not_sent_to_the_stored_host(tmp_path, own_host):
    """A token that came without a host is bound to none: it goes nowhere (no LABEL_STUDIO_URL)."""
    app = create_app(BackendConfig(data_dir=tmp_path))
    http = app.test_client()
    assert http.post("/setup", json=setup_body(own_host.url, TOKEN)).status_code == 200
    assert http.post("/setup", json=setup_body(None, "attacker-token")).status_code == 200
    credentials = app.extensions["rlhf"].credentials
    assert credentials.connection(app.extensions["rlhf"].store.project(PROJECT)) is None


def all_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


def test_token_is_nowhere_in_the_data_dir_in_plaintext(tmp_path):
    http = create_app(BackendConfig(data_dir=tmp_path)).test_client()
    assert http.post("/setup", json=setup_body("http://127.0.0.1:9", TOKEN)).status_code == 200
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert "store.sqlite3-wal" in files  # the WAL is among what is searched
    assert TOKEN.encode() not in all_bytes(tmp_path)


def test_key_file_is_private(tmp_path):
    create_app(BackendConfig(data_dir=tmp_path))
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600


def test_plaintext_tokens_of_an_earlier_store_are_encrypted_on_open(tmp_path):
    db = tmp_path / "store.sqlite3"
    Store(db).initialize()
    with sqlite3.connect(db) as conn:  # what earlier versions wrote
        conn.execute("INSERT INTO label_configs VALUES ('h', '<View/>')")
        conn.execute(
            "INSERT INTO projects(project_id, config_hash, hostname, access_token, updated_at) "
            "VALUES (?, 'h', 'http://127.0.0.1:9', ?, 0)",
            (PROJECT, TOKEN),
        )
    app = create_app(BackendConfig(data_dir=tmp_path))
    services = app.extensions["rlhf"]
    project = services.store.project(PROJECT)
    assert services.credentials.connection(project).token == TOKEN
    services.store.close()
    assert TOKEN.encode() not in all_bytes(tmp_path)


def test_no_token_is_stored_with_label_studio_api_key(tmp_path):
    config = BackendConfig(
        data_dir=tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k" * 40
    )
    app = create_app(config)
    assert app.test_client().post("/setup", json=setup_body("http://x", TOKEN)).status_code == 200
    project = app.extensions["rlhf"].store.project(PROJECT)
    assert project.token_sealed is None
    connection = app.extensions["rlhf"].credentials.connection(project)
    assert (connection.url, connection.token) == ("http://127.0.0.1:9", "k" * 40)


def test_api_key_without_label_studio_url_is_refused():
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL"):
        BackendConfig.from_env({"LABEL_STUDIO_API_KEY": "k" * 40})


@pytest.mark.parametrize("hostname", ["file:///etc/passwd", "localhost:8080", "http://u:p@h/"])
def test_setup_refuses_a_hostname_that_is_not_an_http_url(tmp_path, hostname):
    app = create_app(BackendConfig(data_dir=tmp_path))
    answer = app.test_client().post("/setup", json=setup_body(hostname, TOKEN))
    assert answer.status_code == 400
    assert "hostname" in json.loads(answer.data)["message"]
    assert app.extensions["rlhf"].store.project(PROJECT) is None
