"""Model artifacts on disk: written whole or not at all, and proven unchanged when loaded.

An artifact is a directory (a reward-model or policy checkpoint). :func:`write_atomically` has
it written under a temporary name beside its final place and renames it into place only when
complete: a rename within one directory is atomic on a local filesystem and on NFS, so no reader
ever sees half a checkpoint under a version's name, even on a volume that several machines share
(``RLHF_ARTIFACT_DIR``). It returns the artifact's content hash, which the registry records with
the version; :func:`verify` recomputes it before a load, so a checkpoint changed after it was
written (tampered with, half copied onto a new volume, a disk error) is refused with
:class:`ArtifactIntegrityError` instead of being served.

The content hash is SHA-256 over the files in the order of their relative paths, each as its
path, its size and its bytes (so moving bytes from one file to another changes the hash)::

    sha256( for each file, sorted by relative POSIX path:
            path UTF-8 | 0x00 | size in decimal ASCII | 0x00 | bytes )
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TMP_MARK = ".tmp-"  # a directory whose name holds this is being written (or its writer died)


class ArtifactError(Exception):
    """An artifact cannot be loaded; the message says which and why."""


class ArtifactMissing(ArtifactError):
    """The registry names an artifact that is not on disk (deleted, or the volume not mounted)."""


class ArtifactIntegrityError(ArtifactError):
    """An artifact's content differs from the hash recorded when it was written."""


def content_hash(path: str | Path) -> str:
    """The SHA-256 (hex) of the directory ``path``'s files: relative paths, sizes and bytes."""
    root = Path(path)
    digest = hashlib.sha256()
    for relative in _files(root):
        file = root / relative
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(str(file.stat().st_size).encode("ascii") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> str:
    """Have ``write`` fill a scratch directory, then rename it to ``path``; returns its hash.

    The files are flushed to disk before the rename and the rename before returning, so a
    registry row that names the artifact never outlives it in a crash. A directory already at
    ``path`` (a version reserved by an attempt that crashed before recording it) is replaced.
    If ``write`` raises, nothing is left behind and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        tmp.mkdir()
        write(tmp)
        digest = content_hash(tmp)
        _fsync_tree(tmp)
        if path.exists():
            stale = path.with_name(f".{path.name}{TMP_MARK}replaced-{uuid.uuid4().hex[:12]}")
            path.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return digest


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Delete the scratch directories that writers killed mid-write left in ``directory``.

    Only for a directory nobody is writing to now (a project's, while its one training job
    runs): a live writer's scratch directory looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".") and TMP_MARK in p.name]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info("removed %s, left by a writer that did not finish", leftover)
    return leftovers


def verify(path: str | Path, expected_sha256: str | None) -> None:
    """Refuse an artifact whose content is not what was recorded when it was written.

    ``expected_sha256`` None: a version recorded before content hashes existed; it is loaded
    unchecked (logged at debug level), as before.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactMissing(
            f"artifact {path} is not on disk (deleted by retention, or RLHF_ARTIFACT_DIR is not "
            "the shared volume this version was written to)"
        )
    if expected_sha256 is None:
        logger.debug("artifact %s has no recorded content hash; loaded unchecked", path)
        return
    actual = content_hash(path)
    if actual != expected_sha256:
        raise ArtifactIntegrityError(
            f"artifact {path} does not match the content hash recorded when it was written "
            f"(recorded sha256 {expected_sha256[:16]}…, found {actual[:16]}…): it was changed or "
            "only partly copied since; refusing to load it"
        )


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted (symlinks refused)."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            if os.path.islink(os.path.join(directory, name)):
                raise ArtifactError(f"artifact {root} holds a symbolic link: {name}")
        for name in files:
            found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
