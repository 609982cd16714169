"""Artifacts are written whole or not at all, and a changed one refuses to load."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ml_backend.app import create_app
from rlhf_core.artifacts import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactMissing,
    content_hash,
    remove_leftovers,
    verify,
    write_atomically,
)
from rlhf_core.config import BackendConfig
from rlhf_core.registry import REWARD_MODEL, Registry
from rlhf_core.schema import model_versions
from rlhf_core.serving import load_version
from rlhf_core.store import Store
from tests.test_training_job import seed_annotations
from tests.test_versions import predicted_version, train
from trainer.jobs import registry_for


def write_checkpoint(path: Path) -> None:
    (path / "backbone").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"num_heads": 4}')
    (path / "heads.safetensors").write_bytes(bytes(range(256)) * 64)
    (path / "backbone" / "vocab.txt").write_text("a\nb\n")


def flip_one_byte(file: Path, offset: int = 100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def test_content_hash_is_sha256_over_sorted_paths_sizes_and_bytes(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    expected = hashlib.sha256()
    for name in ("backbone/vocab.txt", "config.json", "heads.safetensors"):
        data = (tmp_path / name).read_bytes()
        expected.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert content_hash(tmp_path) == expected.hexdigest()


def test_content_hash_changes_with_one_flipped_byte_a_renamed_file_or_moved_bytes(
    tmp_path: Path,
) -> None:
    write_checkpoint(tmp_path)
    original = content_hash(tmp_path)
    flip_one_byte(tmp_path / "heads.safetensors")
    assert content_hash(tmp_path) != original

    write_checkpoint(tmp_path)
    assert content_hash(tmp_path) == original
    (tmp_path / "config.json").rename(tmp_path / "config2.json")
    assert content_hash(tmp_path) != original

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"xy"), b.write_bytes(b"z")
    before = content_hash(tmp_path)
    a.write_bytes(b"x"), b.write_bytes(b"yz")  # same bytes in the same order, other split
    assert content_hash(tmp_path) != before


def test_write_atomically_renames_a_complete_directory_into_place(tmp_path: Path) -> None:
    target = tmp_path / "project-1" / "rm-0001"
    seen_during_write: list[bool] = []

    def write(scratch: Path) -> None:
        seen_during_write.append(target.exists())
        assert scratch.parent == target.parent  # same directory: the rename is atomic
        write_checkpoint(scratch)

    digest = write_atomically(target, write)
    assert seen_during_write == [False]  # no reader sees the version's name before it is whole
    assert digest == content_hash(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["rm-0001"]  # no scratch left


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "rm-0001"

    def write(scratch: Path) -> None:
        (scratch / "heads.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, write)
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_replaces_a_leftover_of_a_crashed_attempt(tmp_path: Path) -> None:
    target = tmp_path / "rm-0001"
    target.mkdir()
    (target / "leftover.bin").write_bytes(b"from a crash before the version was recorded")
    digest = write_atomically(target, write_checkpoint)
    assert not (target / "leftover.bin").exists()
    assert digest == content_hash(target)
    assert [p.name for p in tmp_path.iterdir()] == ["rm-0001"]


def test_leftovers_of_killed_writers_are_removed_and_nothing_else(tmp_path: Path) -> None:
    write_atomically(tmp_path / "rm-0001", write_checkpoint)
    killed = tmp_path / ".rm-0002.tmp-0123456789ab"  # as write_atomically names its scratch
    write_checkpoint(killed)
    (tmp_path / ".hidden-but-not-scratch").mkdir()
    assert remove_leftovers(tmp_path) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-not-scratch", "rm-0001"]
    assert remove_leftovers(tmp_path / "no-such-project") == []


def test_verify_accepts_the_artifact_as_written(tmp_path: Path) -> None:
    target = tmp_path / "rm-0001"
    digest = write_atomically(target, write_checkpoint)
    verify(target, digest)
    verify(target, None)  # recorded before hashes existed: loaded unchecked


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: flip_one_byte(p / "heads.safetensors"), id="one-flipped-byte"),
        pytest.param(
            lambda p: (p / "heads.safetensors").write_bytes(
                (p / "heads.safetensors").read_bytes()[:1000]
            ),
            id="half-copied-file",
        ),
        pytest.param(lambda p: (p / "backbone" / "vocab.txt").unlink(), id="missing-file"),
        pytest.param(lambda p: (p / "extra.bin").write_bytes(b"x"), id="added-file"),
    ],
)
def test_verify_refuses_a_changed_artifact(tmp_path: Path, damage) -> None:
    target = tmp_path / "rm-0001"
    digest = write_atomically(target, write_checkpoint)
    damage(target)
    with pytest.raises(ArtifactIntegrityError, match="does not match the content hash"):
        verify(target, digest)


def test_verify_says_when_the_artifact_is_not_on_disk(tmp_path: Path) -> None:
    with pytest.raises(ArtifactMissing, match="not on disk"):
        verify(tmp_path / "rm-0007", "0" * 64)


def test_a_symlink_inside_an_artifact_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(b"secret")
    target = tmp_path / "rm-0001"
    target.mkdir()
    (target / "heads.safetensors").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ArtifactError, match="symbolic link"):
        content_hash(target)


# -- a promoted checkpoint changed on disk ----------------------------------------------------


@pytest.fixture
def trained_config(tmp_path: Path, tiny_backbone: str) -> BackendConfig:
    return BackendConfig(
        data_dir=tmp_path / "data",
        artifact_dir=str(tmp_path / "artifacts"),
        reward_backbone=tiny_backbone,
        reward_heads=4,
        policy_training="off",
        promotion_tolerance=1.0,  # every retrain is promoted
    )


def flip_last_byte(file: Path) -> None:
    """A changed weight (the tensor data ends the file): the checkpoint still loads as such."""
    flip_one_byte(file, offset=file.stat().st_size - 1)


def metric(http, name: str) -> float:
    lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_a_flipped_byte_in_the_promoted_checkpoint_refuses_it_and_keeps_the_previous_version(
    trained_config: BackendConfig,
) -> None:
    config = trained_config
    store = Store(config.resolved_database_url).initialize()
    seed_annotations(store, 40)
    http = create_app(config).test_client()
    train(store, config)
    assert predicted_version(http).startswith("rm-0001.")
    train(store, config)
    registry = registry_for(config)
    promoted = registry.served(1, REWARD_MODEL)
    assert promoted.version == "rm-0002"
    assert promoted.path.parent.parent == config.artifacts_path  # under RLHF_ARTIFACT_DIR
    assert promoted.artifact_sha256 == content_hash(promoted.path)

    flip_last_byte(promoted.path / "heads.safetensors")

    with pytest.raises(ArtifactIntegrityError, match="does not match the content hash"):
        load_version(config, promoted)
    # The serving process keeps the version it had, says so in its predictions, counts it.
    assert predicted_version(http).startswith("rm-0001.")
    assert metric(http, 'rlhf_artifacts_refused_total{kind="rm"}') == 1.0
    # A process that had none loaded serves the base model, not the changed weights.
    fresh = create_app(config).test_client()
    assert predicted_version(fresh).startswith("rm-untrained.")
    assert metric(fresh, 'rlhf_artifacts_refused_total{kind="rm"}') == 1.0
    # A training job does not warm-start from it: it fails, saying why.
    with pytest.raises(ArtifactIntegrityError):
        train(store, config)


# -- the artifact volume mounted elsewhere on another machine ----------------------------------


def machine(tmp_path: Path, name: str, artifact_dir: Path, database_url: str, backbone: str):
    """One machine's configuration: its own data dir, the shared database, the shared
    artifact volume mounted at ``artifact_dir``."""
    return BackendConfig(
        data_dir=tmp_path / f"data-{name}",
        database_url=database_url,
        artifact_dir=str(artifact_dir),
        reward_backbone=backbone,
        reward_heads=4,
        policy_training="off",
        promotion_tolerance=1.0,
    )


def test_a_version_trained_on_one_machine_is_served_by_one_that_mounts_the_volume_elsewhere(
    tmp_path: Path, tiny_backbone: str, database_url: str
) -> None:
    store = Store(database_url).initialize()
    seed_annotations(store, 40)
    first = machine(tmp_path, "a", tmp_path / "mnt-a", database_url, tiny_backbone)
    train(store, first)
    assert registry_for(first).served(1, REWARD_MODEL).version == "rm-0001"
    # The same files, mounted at another path on the second machine (and gone from the first).
    (tmp_path / "mnt-a").rename(tmp_path / "mnt-b")
    second = machine(tmp_path, "b", tmp_path / "mnt-b", database_url, tiny_backbone)

    served = registry_for(second).served(1, REWARD_MODEL)
    assert served.path == tmp_path / "mnt-b" / "project-1" / "rm-0001"
    load_version(second, served)  # found, and its content hash checked
    assert predicted_version(create_app(second).test_client()).startswith("rm-0001.")


def test_a_version_an_older_backend_stored_with_an_absolute_path_still_loads(
    tmp_path: Path, database_url: str
) -> None:
    Store(database_url).initialize()
    old = tmp_path / "mnt-a"
    registry = Registry(database_url, old)
    version, path = registry.new_version_dir(1, REWARD_MODEL)
    digest = write_atomically(path, write_checkpoint)
    registry.record(1, REWARD_MODEL, version, path, {}, {}, {}, artifact_sha256=digest)
    with registry.db.write() as conn:  # as an older backend stored it: the absolute path
        conn.execute(update(model_versions).values(path=str(path)))

    assert registry.get(1, REWARD_MODEL, version).path == path  # where it was written
    old.rename(tmp_path / "mnt-b")  # and where another machine mounts the volume
    moved = Registry(database_url, tmp_path / "mnt-b").get(1, REWARD_MODEL, version)
    assert moved.path == tmp_path / "mnt-b" / "project-1" / version
    verify(moved.path, moved.artifact_sha256)


def test_the_registry_stores_checkpoint_paths_relative_to_the_artifact_dir(
    tmp_path: Path, database_url: str
) -> None:
    Store(database_url).initialize()
    registry = Registry(database_url, tmp_path / "artifacts")
    version, path = registry.new_version_dir(1, REWARD_MODEL)
    registry.record(1, REWARD_MODEL, version, path, {}, {}, {})
    outside = tmp_path / "elsewhere" / "rm-0002"  # a checkpoint kept outside: absolute
    registry.record(1, REWARD_MODEL, "rm-0002", outside, {}, {}, {})
    with registry.db.read() as conn:
        stored = conn.execute(select(model_versions.c.path).order_by(model_versions.c.number))
        assert list(stored.scalars()) == [f"project-1/{version}", str(outside)]
    assert [v.path for v in registry.versions(1)] == [path, outside]
