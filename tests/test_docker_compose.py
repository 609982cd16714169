"""docker-compose.yml parses and lays the backend out as on several machines.

Docker is not available where the tests run, so this reads the file as Compose would (YAML with
merge keys; PyYAML comes with transformers) and checks what the README promises of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from rlhf_core.config import BackendConfig

COMPOSE = Path(__file__).parents[1] / "docker-compose.yml"
BACKENDS = ("rlhf-backend", "rlhf-worker")


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name."""
    return {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}


def test_postgres_is_the_official_image_with_a_health_check() -> None:
    postgres = services()["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    for name in BACKENDS:
        assert services()[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_server_and_second_worker_share_database_artifacts_and_secret_not_data_dir() -> None:
    server, worker = (services()[name] for name in BACKENDS)
    assert worker["command"] == ["rlhf-backend", "worker"]
    for key in ("RLHF_DATABASE_URL", "RLHF_ARTIFACT_DIR", "RLHF_SECRET_KEY"):
        assert server["environment"][key] == worker["environment"][key], key
    assert server["environment"]["RLHF_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in server["environment"]["RLHF_DATABASE_URL"]
    artifact_dir = server["environment"]["RLHF_ARTIFACT_DIR"]
    data_dir = server["environment"]["RLHF_DATA_DIR"]
    assert mounts(server)[artifact_dir] == mounts(worker)[artifact_dir]  # one shared volume
    assert mounts(server)[data_dir] != mounts(worker)[data_dir]  # each machine's own


def test_every_rlhf_variable_in_the_compose_file_is_a_setting() -> None:
    known = {f.metadata["env"] for f in dataclasses.fields(BackendConfig)}
    for name in BACKENDS:
        used = {key for key in services()[name]["environment"] if key.startswith("RLHF_")}
        assert used <= known, f"{name}: not settings: {sorted(used - known)}"
