"""The model registry: every trained version of a project's reward model and policy.

A version is a directory under ``<data_dir>/models/project-<id>/<version>/`` (the checkpoint,
which carries its own config and provenance) plus a row in the store's SQLite file with its
config, training-data snapshot, metrics, creation time and status. ``rm-untrained``
(untrained heads: every prediction says so) and ``policy-base`` (the configured base policy)
exist implicitly from the start.

The served ``model_version`` of a project is ``<reward model>.<policy>``, e.g.
``rm-0003.policy-0001``: it changes only when a new version is promoted, so Label Studio keeps
the predictions it already has between retrains.

A project's lead can pin a version of either kind (``rlhf-backend serve-version``): the pinned
version is then the served one, whatever is promoted after it, until it is unpinned. The pin and
its reason are rows of ``model_pins``.

A training job records its versions as candidates and promotes what passed its gates in one
transaction (:meth:`Registry.promote`), which also writes a row to the Label Studio outbox
(``label_studio_syncs``): the sync of the project's ``model_version`` and re-scored predictions
that a worker retries until Label Studio confirms it (:mod:`trainer.label_studio_sync`). A crash
at any point therefore leaves either nothing promoted or the promotion plus its pending sync.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REWARD_MODEL, POLICY = "rm", "policy"
BASE_VERSIONS = {REWARD_MODEL: "rm-untrained", POLICY: "policy-base"}
CANDIDATE, PROMOTED, REJECTED = "candidate", "promoted", "rejected"

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS model_versions (
    project_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    number INTEGER NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    config TEXT NOT NULL,
    data_snapshot TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at REAL NOT NULL,
    promoted_at REAL,
    PRIMARY KEY (project_id, kind, number)
)""",
    # The outbox: one row per promotion, done once Label Studio shows its model_version.
    """
CREATE TABLE IF NOT EXISTS label_studio_syncs (
    sync_id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    done_at REAL
)""",
    "CREATE INDEX IF NOT EXISTS label_studio_syncs_status"
    " ON label_studio_syncs(status, project_id)",
)
SYNC_PENDING, SYNC_DONE, SYNC_SUPERSEDED = "pending", "done", "superseded"
SYNC_RETRY_DELAYS_S = (5.0, 15.0, 60.0, 300.0, 900.0)  # then every 15 minutes, for ever

PINS_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_pins (
    project_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    reason TEXT NOT NULL,
    pinned_at REAL NOT NULL,
    PRIMARY KEY (project_id, kind)
)
"""


@dataclass(frozen=True)
class Pin:
    """A version served in place of the last promoted one, and why."""

    kind: str
    version: str
    reason: str
    pinned_at: float


@dataclass(frozen=True)
class ModelVersion:
    project_id: int
    kind: str
    version: str
    path: Path | None  # None for the implicit base versions
    status: str
    reason: str | None
    config: dict[str, Any]
    data_snapshot: dict[str, Any]
    metrics: dict[str, Any]
    created_at: float

    @property
    def is_base(self) -> bool:
        return self.path is None


def served_version_string(reward_model: str, policy: str) -> str:
    return f"{reward_model}.{policy}"


class Registry:
    """Versions and promotions, shared by every process through the store's SQLite file."""

    def __init__(self, db_path: Path, models_dir: Path) -> None:
        self.db_path = Path(db_path)
        self.models_dir = Path(models_dir)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute(PINS_SCHEMA)
        return conn

    def new_version_dir(self, project_id: int, kind: str) -> tuple[str, Path]:
        """Reserve the next version name; the trainer writes the checkpoint there."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT MAX(number) FROM model_versions WHERE project_id = ? AND kind = ?",
                (project_id, kind),
            ).fetchone()
        number = (row[0] or 0) + 1
        version = f"{kind}-{number:04d}"
        path = self.project_dir(project_id) / version
        return version, path

    def record(
        self,
        project_id: int,
        kind: str,
        version: str,
        path: Path,
        config: dict[str, Any],
        data_snapshot: dict[str, Any],
        metrics: dict[str, Any],
        status: str = CANDIDATE,
        reason: str | None = None,
    ) -> ModelVersion:
        number = int(version.rsplit("-", 1)[1])
        now = time.time()
        conn = self._connect()
        try:
            conn.execute(
                """INSERT INTO model_versions(project_id, kind, number, version, path, status,
                       reason, config, data_snapshot, metrics, created_at, promoted_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    project_id,
                    kind,
                    number,
                    version,
                    str(path),
                    status,
                    reason,
                    json.dumps(config),
                    json.dumps(data_snapshot),
                    json.dumps(metrics),
                    now,
                    now if status == PROMOTED else None,
                ),
            )
        finally:
            conn.close()
        found = self.get(project_id, kind, version)
        assert found is not None
        return found

    def get(self, project_id: int, kind: str, version: str) -> ModelVersion | None:
        if version == BASE_VERSIONS[kind]:
            return _base(project_id, kind)
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT * FROM model_versions WHERE project_id = ? AND kind = ? AND version = ?",
                (project_id, kind, version),
            ).fetchone()
        finally:
            conn.close()
        return _version(row) if row else None

    def served(self, project_id: int, kind: str) -> ModelVersion:
        """The pinned version of ``kind``, else the newest promoted one, else the base version."""
        conn = self._connect()
        try:
            return _served(conn, project_id, kind)
        finally:
            conn.close()

    def last_promoted(self, project_id: int, kind: str) -> ModelVersion:
        """The newest promoted version of ``kind``, or the base version (pins aside)."""
        conn = self._connect()
        try:
            return _last_promoted(conn, project_id, kind)
        finally:
            conn.close()

    def served_version(self, project_id: int) -> str:
        conn = self._connect()
        try:  # one read transaction: never half of a promotion
            conn.execute("BEGIN")
            version = _served_version(conn, project_id)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return version

    def promote(self, project_id: int, versions: dict[str, str]) -> str:
        """Make recorded candidates (``kind -> version``) served, all at once, and queue the
        Label Studio sync of the new served version in the same transaction; returns it.

        Older pending syncs of the project are superseded: Label Studio need only show the
        newest served version.
        """
        now = time.time()
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for kind, version in versions.items():
                    updated = conn.execute(
                        """UPDATE model_versions SET status = ?, promoted_at = ?
                           WHERE project_id = ? AND kind = ? AND version = ?""",
                        (PROMOTED, now, project_id, kind, version),
                    ).rowcount
                    if updated != 1:
                        raise LookupError(f"project {project_id}: no recorded {version} to promote")
                served = _served_version(conn, project_id)
                _queue_sync(conn, project_id, served, now)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
        return served

    def queue_sync(self, project_id: int) -> str:
        """Queue a Label Studio sync of the served version (e.g. a project connected anew)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            served = _served_version(conn, project_id)
            _queue_sync(conn, project_id, served, time.time())
            conn.execute("COMMIT")
        finally:
            conn.close()
        return served

    def pending_syncs(self, project_id: int | None = None, due: bool = False) -> list[Sync]:
        """Syncs not yet confirmed by Label Studio (with ``due``: only those to try now)."""
        query, params = "SELECT * FROM label_studio_syncs WHERE status = ?", [SYNC_PENDING]
        if project_id is not None:
            query, params = query + " AND project_id = ?", [*params, project_id]
        if due:
            query, params = query + " AND next_attempt_at <= ?", [*params, time.time()]
        conn = self._connect()
        try:
            rows = conn.execute(query + " ORDER BY sync_id", params).fetchall()
        finally:
            conn.close()
        return [_sync(row) for row in rows]

    def sync_failed(self, sync_id: int, error: str) -> None:
        """Record a failed attempt; the next one waits longer (SYNC_RETRY_DELAYS_S)."""
        conn = self._connect()
        try:
            attempts = conn.execute(
                "SELECT attempts FROM label_studio_syncs WHERE sync_id = ?", (sync_id,)
            ).fetchone()[0]
            delay = SYNC_RETRY_DELAYS_S[min(attempts, len(SYNC_RETRY_DELAYS_S) - 1)]
            conn.execute(
                """UPDATE label_studio_syncs SET attempts = attempts + 1, error = ?,
                       next_attempt_at = ? WHERE sync_id = ?""",
                (error, time.time() + delay, sync_id),
            )
        finally:
            conn.close()

    def sync_confirmed(self, sync_id: int) -> None:
        conn = self._connect()
        try:
            conn.execute(
                """UPDATE label_studio_syncs SET status = ?, attempts = attempts + 1,
                       error = NULL, done_at = ? WHERE sync_id = ? AND status = ?""",
                (SYNC_DONE, time.time(), sync_id, SYNC_PENDING),
            )
        finally:
            conn.close()

    def versions(self, project_id: int, kind: str | None = None) -> list[ModelVersion]:
        query = "SELECT * FROM model_versions WHERE project_id = ?"
        params: tuple[Any, ...] = (project_id,)
        if kind:
            query, params = query + " AND kind = ?", (*params, kind)
        conn = self._connect()
        try:
            rows = conn.execute(query + " ORDER BY kind, number", params).fetchall()
        finally:
            conn.close()
        return [_version(row) for row in rows]

    def recorded_by_job(self, project_id: int, job_id: int) -> list[ModelVersion]:
        """Versions an earlier attempt of training job ``job_id`` recorded (its retry resumes)."""
        conn = self._connect()
        try:
            rows = conn.execute(
                """SELECT * FROM model_versions WHERE project_id = ?
                   AND json_extract(data_snapshot, '$.job') = ? ORDER BY kind, number""",
                (project_id, job_id),
            ).fetchall()
        finally:
            conn.close()
        return [_version(row) for row in rows]

    def set_status(
        self, project_id: int, kind: str, version: str, status: str, reason: str
    ) -> None:
        conn = self._connect()
        try:
            conn.execute(
                """UPDATE model_versions SET status = ?, reason = ?,
                       promoted_at = CASE WHEN ? = 'promoted' THEN ? ELSE promoted_at END
                   WHERE project_id = ? AND kind = ? AND version = ?""",
                (status, reason, status, time.time(), project_id, kind, version),
            )
        finally:
            conn.close()

    def project_dir(self, project_id: int) -> Path:
        return self.models_dir / f"project-{project_id}"

    def disk_usage(self, project_id: int) -> int:
        """Bytes of the project's checkpoints on disk."""
        return directory_bytes(self.project_dir(project_id))

    def pin(self, project_id: int, kind: str, version: str, reason: str) -> Pin:
        """Serve ``version`` of ``kind`` from now on, whatever is promoted later."""
        conn = self._connect()
        try:
            conn.execute(
                """INSERT OR REPLACE INTO model_pins(project_id, kind, version, reason, pinned_at)
                   VALUES (?, ?, ?, ?, ?)""",
                (project_id, kind, version, reason, time.time()),
            )
        finally:
            conn.close()
        return self.pins(project_id)[kind]

    def unpin(self, project_id: int) -> list[Pin]:
        """Drop the project's pins (the last promoted versions serve again); returns them."""
        removed = list(self.pins(project_id).values())
        conn = self._connect()
        try:
            conn.execute("DELETE FROM model_pins WHERE project_id = ?", (project_id,))
        finally:
            conn.close()
        return removed

    def pins(self, project_id: int) -> dict[str, Pin]:
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT * FROM model_pins WHERE project_id = ? ORDER BY kind", (project_id,)
            ).fetchall()
        finally:
            conn.close()
        return {
            row["kind"]: Pin(row["kind"], row["version"], row["reason"], row["pinned_at"])
            for row in rows
        }


def _last_promoted(conn: sqlite3.Connection, project_id: int, kind: str) -> ModelVersion:
    row = conn.execute(
        """SELECT * FROM model_versions WHERE project_id = ? AND kind = ? AND status = ?
           ORDER BY promoted_at DESC, number DESC LIMIT 1""",
        (project_id, kind, PROMOTED),
    ).fetchone()
    return _version(row) if row else _base(project_id, kind)


def _pinned(conn: sqlite3.Connection, project_id: int, kind: str) -> ModelVersion | None:
    pin = conn.execute(
        "SELECT version FROM model_pins WHERE project_id = ? AND kind = ?", (project_id, kind)
    ).fetchone()
    if pin is None:
        return None
    if pin[0] == BASE_VERSIONS[kind]:
        return _base(project_id, kind)
    row = conn.execute(
        "SELECT * FROM model_versions WHERE project_id = ? AND kind = ? AND version = ?",
        (project_id, kind, pin[0]),
    ).fetchone()
    return _version(row) if row else None


def directory_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # deleted by retention meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@dataclass(frozen=True)
class Sync:
    """A promotion's pending (or finished) sync to Label Studio: the outbox row."""

    sync_id: int
    project_id: int
    model_version: str
    status: str
    attempts: int
    error: str | None
    next_attempt_at: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _served(conn: sqlite3.Connection, project_id: int, kind: str) -> ModelVersion:
    """The pinned version of ``kind``, else the newest promoted one, else the base version."""
    return _pinned(conn, project_id, kind) or _last_promoted(conn, project_id, kind)


def _served_version(conn: sqlite3.Connection, project_id: int) -> str:
    return served_version_string(
        _served(conn, project_id, REWARD_MODEL).version, _served(conn, project_id, POLICY).version
    )


def _queue_sync(conn: sqlite3.Connection, project_id: int, version: str, now: float) -> None:
    conn.execute(
        "UPDATE label_studio_syncs SET status = ? WHERE project_id = ? AND status = ?",
        (SYNC_SUPERSEDED, project_id, SYNC_PENDING),
    )
    conn.execute(
        """INSERT INTO label_studio_syncs(project_id, model_version, status, created_at,
               next_attempt_at) VALUES (?, ?, ?, ?, ?)""",
        (project_id, version, SYNC_PENDING, now, now),
    )


def _sync(row: sqlite3.Row) -> Sync:
    return Sync(
        sync_id=row["sync_id"],
        project_id=row["project_id"],
        model_version=row["model_version"],
        status=row["status"],
        attempts=row["attempts"],
        error=row["error"],
        next_attempt_at=row["next_attempt_at"],
    )


def _base(project_id: int, kind: str) -> ModelVersion:
    return ModelVersion(
        project_id=project_id,
        kind=kind,
        version=BASE_VERSIONS[kind],
        path=None,
        status=PROMOTED,
        reason="base version (no training yet)",
        config={},
        data_snapshot={},
        metrics={},
        created_at=0.0,
    )


def _version(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        project_id=row["project_id"],
        kind=row["kind"],
        version=row["version"],
        path=Path(row["path"]),
        status=row["status"],
        reason=row["reason"],
        config=json.loads(row["config"]),
        data_snapshot=json.loads(row["data_snapshot"]),
        metrics=json.loads(row["metrics"]),
        created_at=row["created_at"],
    )
