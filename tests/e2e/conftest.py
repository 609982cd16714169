"""Fixtures: one Label Studio server per session, backends on demand, a fresh project per test."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from label_studio_sdk.client import LabelStudio

from .harness import (
    E2E_CACHE,
    PAIRWISE_TASKS,
    Backend,
    LabelStudioServer,
    Project,
    create_project,
    label_studio_binary,
    migrated_database,
    start_backend,
    start_label_studio,
)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    binary = label_studio_binary()
    if not binary.exists():
        pytest.fail(f"no Label Studio at {binary} (LABEL_STUDIO_BIN)")
    database = migrated_database(binary, E2E_CACHE)
    server = start_label_studio(binary, tmp_path_factory.mktemp("label-studio"), database)
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    server = start_backend(tmp_path_factory.mktemp("backend") / "data")
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="session")
def auth_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A second backend that demands basic auth on everything but /health."""
    auth = ("labelstudio", secrets.token_urlsafe(12))
    server = start_backend(tmp_path_factory.mktemp("auth-backend") / "data", auth=auth)
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="module")
def training_backend(
    tmp_path_factory: pytest.TempPathFactory, label_studio: LabelStudioServer
) -> Iterator[Backend]:
    """A backend that retrains after every 4 usable annotations (the default is 50).

    Label Studio's /setup names it ``http://localhost:8080`` unless LABEL_STUDIO_HOST is set; a
    deployment elsewhere tells the backend with LABEL_STUDIO_URL, as this one does, so the
    re-scoring job after a promotion reaches it."""
    data_dir = tmp_path_factory.mktemp("training-backend") / "data"
    server = start_backend(data_dir, RLHF_TRAIN_EVERY="4", LABEL_STUDIO_URL=label_studio.url)
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture
def ls(label_studio: LabelStudioServer) -> LabelStudio:
    return label_studio.client()


@pytest.fixture
def make_project(ls: LabelStudio, request: pytest.FixtureRequest) -> Callable[[], Project]:
    """A fresh project (pairwise config, three tasks), titled after the test."""
    return lambda: create_project(ls, request.node.name, PAIRWISE_TASKS)
