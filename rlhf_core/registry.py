"""The model registry: every trained version of a project's reward model and policy.

A version is a directory under ``<artifact dir>/project-<id>/<version>/`` (the checkpoint,
which carries its own config and provenance) plus a row of ``model_versions`` in the store's
database (:mod:`rlhf_core.db`) with its config, training-data snapshot, metrics, creation time,
status and the checkpoint's content hash. The row holds the checkpoint's path relative to the
artifact dir (``RLHF_ARTIFACT_DIR``), resolved by each process under its own, so machines that
share the artifact volume may mount it at different paths. ``rm-untrained``
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
Promotion times come from the database's clock, so the order of promotions made on different
machines is the order they happened in, whatever each machine's clock says.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, RowMapping, delete, func, insert, select, update

from rlhf_core.db import Database, as_database, db_now, upsert
from rlhf_core.schema import label_studio_syncs, model_pins, model_versions

REWARD_MODEL, POLICY = "rm", "policy"
BASE_VERSIONS = {REWARD_MODEL: "rm-untrained", POLICY: "policy-base"}
CANDIDATE, PROMOTED, REJECTED = "candidate", "promoted", "rejected"

SYNC_PENDING, SYNC_DONE, SYNC_SUPERSEDED = "pending", "done", "superseded"
SYNC_RETRY_DELAYS_S = (5.0, 15.0, 60.0, 300.0, 900.0)  # then every 15 minutes, for ever


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
    path: Path | None  # resolved on this machine; None for the implicit base versions
    status: str
    reason: str | None
    config: dict[str, Any]
    data_snapshot: dict[str, Any]
    metrics: dict[str, Any]
    created_at: float
    artifact_sha256: str | None = None  # the checkpoint's content hash (None: not recorded)

    @property
    def is_base(self) -> bool:
        return self.path is None


def served_version_string(reward_model: str, policy: str) -> str:
    return f"{reward_model}.{policy}"


class Registry:
    """Versions and promotions, shared by every process (and machine) through the database.

    ``target``: a :class:`~rlhf_core.db.Database`, a database URL, or a SQLite file's path; the
    schema is the store's (``Store.initialize`` / ``rlhf-backend migrate`` make it)."""

    def __init__(self, target: Database | str | Path, models_dir: Path) -> None:
        self.db = as_database(target)
        self.models_dir = Path(models_dir)

    def new_version_dir(self, project_id: int, kind: str) -> tuple[str, Path]:
        """Reserve the next version name; the trainer writes the checkpoint there."""
        with self.db.read() as conn:
            number = conn.execute(
                select(func.max(model_versions.c.number)).where(
                    model_versions.c.project_id == project_id, model_versions.c.kind == kind
                )
            ).scalar()
        version = f"{kind}-{(number or 0) + 1:04d}"
        return version, self.project_dir(project_id) / version

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
        artifact_sha256: str | None = None,
    ) -> ModelVersion:
        with self.db.write() as conn:
            conn.execute(
                insert(model_versions).values(
                    project_id=project_id,
                    kind=kind,
                    number=int(version.rsplit("-", 1)[1]),
                    version=version,
                    path=self._stored_path(path),
                    status=status,
                    reason=reason,
                    config=json.dumps(config),
                    data_snapshot=json.dumps(data_snapshot),
                    metrics=json.dumps(metrics),
                    created_at=db_now(),
                    promoted_at=db_now() if status == PROMOTED else None,
                    artifact_sha256=artifact_sha256,
                )
            )
        found = self.get(project_id, kind, version)
        assert found is not None
        return found

    def set_artifact_sha256(self, project_id: int, kind: str, version: str, digest: str) -> None:
        """Record the content hash of a version's checkpoint (written after it was recorded)."""
        with self.db.write() as conn:
            conn.execute(
                update(model_versions)
                .where(_named(project_id, kind, version))
                .values(artifact_sha256=digest)
            )

    def get(self, project_id: int, kind: str, version: str) -> ModelVersion | None:
        if version == BASE_VERSIONS[kind]:
            return _base(project_id, kind)
        with self.db.read() as conn:
            row = (
                conn.execute(select(model_versions).where(_named(project_id, kind, version)))
                .mappings()
                .first()
            )
        return self._resolved(_version(row)) if row else None

    def served(self, project_id: int, kind: str) -> ModelVersion:
        """The pinned version of ``kind``, else the newest promoted one, else the base version."""
        with self.db.read() as conn:
            return self._resolved(_served(conn, project_id, kind))

    def last_promoted(self, project_id: int, kind: str) -> ModelVersion:
        """The newest promoted version of ``kind``, or the base version (pins aside)."""
        with self.db.read() as conn:
            return self._resolved(_last_promoted(conn, project_id, kind))

    def served_version(self, project_id: int) -> str:
        with self.db.read() as conn:  # one snapshot: never half of a promotion
            return _served_version(conn, project_id)

    def promote(self, project_id: int, versions: dict[str, str]) -> str:
        """Make recorded candidates (``kind -> version``) served, all at once, and queue the
        Label Studio sync of the new served version in the same transaction; returns it.

        Older pending syncs of the project are superseded: Label Studio need only show the
        newest served version.
        """
        with self.db.write() as conn:
            self.db.lock(conn, "registry", project_id)
            for kind, version in versions.items():
                updated = conn.execute(
                    update(model_versions)
                    .where(_named(project_id, kind, version))
                    .values(status=PROMOTED, promoted_at=db_now())
                ).rowcount
                if updated != 1:
                    raise LookupError(f"project {project_id}: no recorded {version} to promote")
            served = _served_version(conn, project_id)
            _queue_sync(conn, project_id, served)
        return served

    def queue_sync(self, project_id: int) -> str:
        """Queue a Label Studio sync of the served version (e.g. a project connected anew)."""
        with self.db.write() as conn:
            self.db.lock(conn, "registry", project_id)
            served = _served_version(conn, project_id)
            _queue_sync(conn, project_id, served)
        return served

    def pending_syncs(self, project_id: int | None = None, due: bool = False) -> list[Sync]:
        """Syncs not yet confirmed by Label Studio (with ``due``: only those to try now)."""
        query = select(label_studio_syncs).where(label_studio_syncs.c.status == SYNC_PENDING)
        if project_id is not None:
            query = query.where(label_studio_syncs.c.project_id == project_id)
        if due:
            query = query.where(label_studio_syncs.c.next_attempt_at <= db_now())
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(label_studio_syncs.c.sync_id)).mappings().all()
        return [_sync(row) for row in rows]

    def sync_failed(self, sync_id: int, error: str) -> None:
        """Record a failed attempt; the next one waits longer (SYNC_RETRY_DELAYS_S)."""
        this = label_studio_syncs.c.sync_id == sync_id
        with self.db.write() as conn:
            attempts = conn.execute(select(label_studio_syncs.c.attempts).where(this)).scalar_one()
            delay = SYNC_RETRY_DELAYS_S[min(attempts, len(SYNC_RETRY_DELAYS_S) - 1)]
            conn.execute(
                update(label_studio_syncs)
                .where(this)
                .values(
                    attempts=label_studio_syncs.c.attempts + 1,
                    error=error,
                    next_attempt_at=db_now() + delay,
                )
            )

    def sync_confirmed(self, sync_id: int) -> None:
        with self.db.write() as conn:
            conn.execute(
                update(label_studio_syncs)
                .where(
                    label_studio_syncs.c.sync_id == sync_id,
                    label_studio_syncs.c.status == SYNC_PENDING,
                )
                .values(
                    status=SYNC_DONE,
                    attempts=label_studio_syncs.c.attempts + 1,
                    error=None,
                    done_at=db_now(),
                )
            )

    def versions(self, project_id: int, kind: str | None = None) -> list[ModelVersion]:
        query = select(model_versions).where(model_versions.c.project_id == project_id)
        if kind:
            query = query.where(model_versions.c.kind == kind)
        query = query.order_by(model_versions.c.kind, model_versions.c.number)
        with self.db.read() as conn:
            return [self._resolved(_version(row)) for row in conn.execute(query).mappings()]

    def recorded_by_job(self, project_id: int, job_id: int) -> list[ModelVersion]:
        """Versions an earlier attempt of training job ``job_id`` recorded (its retry resumes)."""
        return [v for v in self.versions(project_id) if v.data_snapshot.get("job") == job_id]

    def set_status(
        self, project_id: int, kind: str, version: str, status: str, reason: str
    ) -> None:
        values: dict[str, Any] = {"status": status, "reason": reason}
        if status == PROMOTED:
            values["promoted_at"] = db_now()
        with self.db.write() as conn:
            conn.execute(
                update(model_versions).where(_named(project_id, kind, version)).values(**values)
            )

    def project_dir(self, project_id: int) -> Path:
        return self.models_dir / f"project-{project_id}"

    def _stored_path(self, path: Path) -> str:
        """A checkpoint's path as the registry stores it: relative to the artifact dir when
        it lies there, so each machine may mount the shared volume where it likes."""
        try:
            return Path(path).relative_to(self.models_dir).as_posix()
        except ValueError:  # outside the artifact dir: only this absolute path names it
            return str(path)

    def _resolved(self, version: ModelVersion) -> ModelVersion:
        """``version`` with its stored path resolved on this machine: a relative one under
        this process's artifact dir. An absolute one (written by an older backend, or a
        checkpoint kept outside the artifact dir) stays as it is where it exists; where it does
        not but its ``project-N/<version>`` does under this artifact dir (an older backend's
        row read on a machine that mounts the volume elsewhere), that one."""
        if version.path is None:
            return version
        if not version.path.is_absolute():
            return replace(version, path=self.models_dir / version.path)
        moved = self.project_dir(version.project_id) / version.path.name
        if version.path.name == version.version and not version.path.exists() and moved.exists():
            return replace(version, path=moved)
        return version

    def disk_usage(self, project_id: int) -> int:
        """Bytes of the project's checkpoints on disk."""
        return directory_bytes(self.project_dir(project_id))

    def pin(self, project_id: int, kind: str, version: str, reason: str) -> Pin:
        """Serve ``version`` of ``kind`` from now on, whatever is promoted later."""
        statement = upsert(self.db, model_pins).values(
            project_id=project_id, kind=kind, version=version, reason=reason, pinned_at=db_now()
        )
        new = statement.excluded
        with self.db.write() as conn:
            self.db.lock(conn, "registry", project_id)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[model_pins.c.project_id, model_pins.c.kind],
                    set_={"version": new.version, "reason": new.reason, "pinned_at": new.pinned_at},
                )
            )
        return self.pins(project_id)[kind]

    def unpin(self, project_id: int) -> list[Pin]:
        """Drop the project's pins (the last promoted versions serve again); returns them."""
        removed = list(self.pins(project_id).values())
        with self.db.write() as conn:
            self.db.lock(conn, "registry", project_id)
            conn.execute(delete(model_pins).where(model_pins.c.project_id == project_id))
        return removed

    def pins(self, project_id: int) -> dict[str, Pin]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(model_pins)
                .where(model_pins.c.project_id == project_id)
                .order_by(model_pins.c.kind)
            ).mappings()
            return {
                row["kind"]: Pin(row["kind"], row["version"], row["reason"], row["pinned_at"])
                for row in rows
            }


def _named(project_id: int, kind: str, version: str) -> Any:
    return (
        (model_versions.c.project_id == project_id)
        & (model_versions.c.kind == kind)
        & (model_versions.c.version == version)
    )


def _last_promoted(conn: Connection, project_id: int, kind: str) -> ModelVersion:
    row = (
        conn.execute(
            select(model_versions)
            .where(
                model_versions.c.project_id == project_id,
                model_versions.c.kind == kind,
                model_versions.c.status == PROMOTED,
            )
            .order_by(model_versions.c.promoted_at.desc(), model_versions.c.number.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return _version(row) if row else _base(project_id, kind)


def _pinned(conn: Connection, project_id: int, kind: str) -> ModelVersion | None:
    pinned = conn.execute(
        select(model_pins.c.version).where(
            model_pins.c.project_id == project_id, model_pins.c.kind == kind
        )
    ).scalar()
    if pinned is None:
        return None
    if pinned == BASE_VERSIONS[kind]:
        return _base(project_id, kind)
    row = (
        conn.execute(select(model_versions).where(_named(project_id, kind, pinned)))
        .mappings()
        .first()
    )
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


def _served(conn: Connection, project_id: int, kind: str) -> ModelVersion:
    """The pinned version of ``kind``, else the newest promoted one, else the base version."""
    return _pinned(conn, project_id, kind) or _last_promoted(conn, project_id, kind)


def _served_version(conn: Connection, project_id: int) -> str:
    return served_version_string(
        _served(conn, project_id, REWARD_MODEL).version, _served(conn, project_id, POLICY).version
    )


def _queue_sync(conn: Connection, project_id: int, version: str) -> None:
    conn.execute(
        update(label_studio_syncs)
        .where(
            label_studio_syncs.c.project_id == project_id,
            label_studio_syncs.c.status == SYNC_PENDING,
        )
        .values(status=SYNC_SUPERSEDED)
    )
    conn.execute(
        insert(label_studio_syncs).values(
            project_id=project_id,
            model_version=version,
            status=SYNC_PENDING,
            created_at=db_now(),
            next_attempt_at=db_now(),
        )
    )


def _sync(row: RowMapping) -> Sync:
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


def _version(row: RowMapping) -> ModelVersion:
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
        artifact_sha256=row["artifact_sha256"],
    )
