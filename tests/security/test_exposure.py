"""What is open: with basic auth only /health; a public bind without it is warned about."""

from __future__ import annotations

import base64
import logging

import pytest

from ml_backend.app import create_app
from ml_backend.server import exposure_warning
from rlhf_cli import main as cli
from rlhf_core.config import BackendConfig


def test_index_needs_basic_auth_like_every_endpoint_but_health(tmp_path):
    config = BackendConfig(data_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")
    http = create_app(config).test_client()
    assert http.get("/health").status_code == 200
    assert http.get("/").status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    assert http.get("/", headers=auth).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "backend.internal"])
def test_public_bind_without_basic_auth_is_warned_about(host):
    warning = exposure_warning(BackendConfig(host=host))
    assert warning is not None
    assert "BASIC_AUTH_USER" in warning and "BASIC_AUTH_PASS" in warning and host in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_bind_is_not_warned_about(host):
    assert exposure_warning(BackendConfig(host=host)) is None


def test_basic_auth_silences_the_warning():
    config = BackendConfig(host="0.0.0.0", basic_auth_user="ls", basic_auth_pass="s3cret")
    assert exposure_warning(config) is None


def test_serve_logs_the_warning_before_it_listens(tmp_path, monkeypatch, caplog):
    import ml_backend.server

    monkeypatch.setattr(ml_backend.server, "run_gunicorn", lambda config: 0)  # do not listen
    monkeypatch.setenv("RLHF_EMBEDDED_WORKER", "0")
    # serve sets PROMETHEUS_MULTIPROC_DIR in this process; monkeypatch restores it afterwards,
    # so later in-process apps keep their own (single-process) metrics.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 0
    assert any("BASIC_AUTH_USER" in r.getMessage() for r in caplog.records)
