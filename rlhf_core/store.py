"""The durable annotation store: SQLite in WAL mode under the data directory.

Every webhook the backend acknowledges is committed here first, so it survives ``kill -9`` of the
server: in WAL mode a commit is in the WAL file before the answer goes out. ``synchronous`` is
``NORMAL`` by default (the WAL is fsynced at checkpoints: an OS crash or power loss may lose the
last commits, a killed process never does) and ``FULL`` with ``RLHF_STORE_SYNC=full`` (fsync on
every commit: power-loss safe, and each webhook then waits for the disk; on this project's CI
machine that put p99 above 100 ms). Several gunicorn workers, the trainer worker and the CLI share
the file; each process (and thread) opens its own connection lazily, never across a fork.

State is kept equal to what Label Studio holds, whatever order deliveries arrive in:

* an annotation row is replaced only by a delivery whose Label Studio ``updated_at`` is not older
  than the stored one (a late ``ANNOTATION_CREATED`` does not undo an earlier-arrived update);
* a deletion leaves a tombstone, which no later create or update resurrects (Label Studio never
  reuses annotation ids);
* the training records derived from an annotation are replaced in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS label_configs (
    config_hash TEXT PRIMARY KEY,
    xml TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    project_id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL REFERENCES label_configs(config_hash),
    hostname TEXT,
    access_token TEXT, -- plaintext, from earlier versions: emptied on open
    model_version TEXT,
    updated_at REAL NOT NULL,
    token_sealed TEXT, -- the Label Studio token that came with `hostname`, encrypted
    webhook_secret_sealed TEXT -- the secret this backend puts on the project's webhook, encrypted
);
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id INTEGER NOT NULL,
    project_id INTEGER NOT NULL,
    task_id INTEGER,
    annotator INTEGER,
    config_hash TEXT REFERENCES label_configs(config_hash),
    task_data TEXT,
    result TEXT,
    was_cancelled INTEGER NOT NULL DEFAULT 0,
    ls_updated_at TEXT NOT NULL DEFAULT '',
    deleted INTEGER NOT NULL DEFAULT 0,
    kinds TEXT NOT NULL DEFAULT '',
    seq INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    -- Label Studio numbers annotations per instance: an id alone may name annotations of two
    -- projects (or of two instances' projects), so the project is part of the key.
    PRIMARY KEY (project_id, annotation_id)
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations(project_id, deleted);
-- Every stored webhook counts the project's changes since its last job: a range, not a scan.
CREATE INDEX IF NOT EXISTS annotations_changes ON annotations(project_id, seq);
-- Which label configs are still referenced (unreferenced ones are collected).
CREATE INDEX IF NOT EXISTS annotations_config ON annotations(config_hash);
CREATE TABLE IF NOT EXISTS records (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,
    annotation_id INTEGER NOT NULL,
    project_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_owner ON records(project_id, annotation_id);
CREATE INDEX IF NOT EXISTS records_project ON records(project_id, kind);
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    trigger TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    worker TEXT,
    seq_at_enqueue INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    heartbeat_at REAL,
    finished_at REAL,
    progress TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, project_id);
-- Which model versions wrote a task's responses and scored it (pre-annotation), for exports.
CREATE TABLE IF NOT EXISTS task_models (
    project_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    generated_by TEXT,
    scored_by TEXT,
    PRIMARY KEY (project_id, task_id)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Which policy version wrote which response of an arena task (rlhf_core.arena), and what the
-- reward model serving then thought of it: the leaderboard's link from a label to versions.
CREATE TABLE IF NOT EXISTS arena_responses (
    project_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    text_hash TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    chars INTEGER NOT NULL,
    rm_reward REAL,
    rm_version TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (project_id, task_id, text_hash)
);
"""

JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED = "queued", "running", "done", "failed"
JOB_TRAIN, JOB_PREANNOTATE, JOB_RECONCILE = "train", "preannotate", "reconcile"


@dataclass(frozen=True)
class IncomingAnnotation:
    """One annotation as Label Studio delivered it, with the task and label config it belongs to."""

    annotation_id: int
    project_id: int
    task_id: int | None
    annotator: int | None
    task_data: dict[str, Any]
    result: list[dict[str, Any]]
    was_cancelled: bool
    ls_updated_at: str
    label_config: str


@dataclass(frozen=True)
class Project:
    project_id: int
    label_config: str
    hostname: str | None  # the Label Studio URL the token came with
    token_sealed: str | None  # encrypted (rlhf_core.vault); None when not stored
    webhook_secret_sealed: str | None  # None for a project never connected through /setup
    model_version: str | None


@dataclass(frozen=True)
class StoredAnnotation:
    annotation_id: int
    project_id: int
    task_id: int | None
    annotator: int | None
    task_data: dict[str, Any]
    result: list[dict[str, Any]]
    was_cancelled: bool
    ls_updated_at: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    job_id: int
    project_id: int
    kind: str
    status: str
    trigger: str
    attempts: int
    error: str | None
    result: dict[str, Any] | None = None


def config_hash(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()[:16]


class Store:
    """Thread- and process-safe access to the SQLite store at ``path``."""

    def __init__(
        self, path: Path, synchronous: str = "normal", checkpoint_every_s: float | None = None
    ) -> None:
        """``checkpoint_every_s``: copy the WAL into the database from a background thread of
        each process at this interval, instead of inside whichever commit crosses SQLite's
        1000-page mark (that commit would wait for the copy and its fsync: the request path's
        slowest moments). None: SQLite's automatic checkpoints."""
        if synchronous.lower() not in ("normal", "full"):
            raise ValueError(f"synchronous={synchronous!r}: choose 'normal' or 'full'.")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.checkpoint_every_s = checkpoint_every_s
        self._local = threading.local()
        self._pid = os.getpid()
        self._checkpointer: threading.Thread | None = None

    # -- connections -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: never reuse the parent's connections
            self._local = threading.local()
            self._pid = os.getpid()
            self._checkpointer = None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            if self.checkpoint_every_s is not None:
                conn.execute("PRAGMA wal_autocheckpoint=0")
                self._start_checkpointer()
            self._local.conn = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _start_checkpointer(self) -> None:
        if self._checkpointer is not None:
            return
        self._checkpointer = threading.Thread(
            target=self._checkpoint_forever, name="store-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_forever(self) -> None:
        assert self.checkpoint_every_s is not None
        conn = self._open()
        while True:
            time.sleep(self.checkpoint_every_s)
            try:  # PASSIVE: copies what no reader still needs, never blocks readers or writers
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.OperationalError as exc:  # e.g. another process's checkpoint runs
                logger.info("checkpoint skipped: %s", exc)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken with BEGIN IMMEDIATE so concurrent writers queue up."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def initialize(self, seal: Callable[[str], str | None] | None = None) -> Store:
        """Create or upgrade the schema. ``seal``: how to keep the tokens an earlier version
        stored in plaintext (None from it drops a token); without it they wait for a process
        that has the key."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            _migrate_annotation_key(conn)
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "progress" not in columns:  # a store written before progress was recorded
                conn.execute("ALTER TABLE jobs ADD COLUMN progress TEXT")
            columns = {row[1] for row in conn.execute("PRAGMA table_info(projects)")}
            for column in ("token_sealed", "webhook_secret_sealed"):
                if column not in columns:  # a store written before secrets were encrypted
                    conn.execute(f"ALTER TABLE projects ADD COLUMN {column} TEXT")
        if seal is not None:
            self._seal_plaintext_tokens(seal)
        return self

    def _seal_plaintext_tokens(self, seal: Callable[[str], str | None]) -> None:
        conn = self._connection()
        rows = conn.execute(
            "SELECT project_id, access_token FROM projects WHERE access_token IS NOT NULL"
        ).fetchall()
        if not rows:
            return
        # Overwrite the freed plaintext in the file, then empty the WAL that may still hold it.
        conn.execute("PRAGMA secure_delete=ON")
        with self._write() as tx:
            for project_id, token in rows:
                tx.execute(
                    """UPDATE projects SET token_sealed = ?, access_token = NULL
                       WHERE project_id = ?""",
                    (seal(token), project_id),
                )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        logger.info(
            "encrypted the Label Studio tokens of %d projects stored in plaintext", len(rows)
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- projects ----------------------------------------------------------------------------

    def upsert_project(self, project_id: int, label_config: str) -> None:
        """Remember a project's label config (from a webhook event: no credentials)."""
        with self._write() as conn:
            old = _stored_config_hash(conn, project_id)
            digest = _put_config(conn, label_config)
            conn.execute(
                """INSERT INTO projects(project_id, config_hash, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT(project_id) DO UPDATE SET
                     config_hash = excluded.config_hash, updated_at = excluded.updated_at""",
                (project_id, digest, time.time()),
            )
            _collect_replaced_config(conn, old, digest)

    def connect_project(
        self,
        project_id: int,
        label_config: str,
        hostname: str | None,
        token_sealed: str | None,
        new_webhook_secret_sealed: str,
    ) -> None:
        """/setup: the label config, and the Label Studio host with the token that came with it.

        A token stays bound to the host it came with: a token replaces the stored pair (its host
        None when none came with it); a host without a token never moves the stored token to
        that host (it is recorded only while no token is stored). ``new_webhook_secret_sealed``
        is kept only when the project has no webhook secret yet.
        """
        with self._write() as conn:
            old = _stored_config_hash(conn, project_id)
            digest = _put_config(conn, label_config)
            # Every SET expression reads the row as it was before this statement.
            conn.execute(
                """INSERT INTO projects(project_id, config_hash, hostname, token_sealed,
                       webhook_secret_sealed, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(project_id) DO UPDATE SET
                     config_hash = excluded.config_hash,
                     hostname = CASE
                       WHEN excluded.token_sealed IS NOT NULL THEN excluded.hostname
                       WHEN projects.token_sealed IS NULL
                         THEN COALESCE(excluded.hostname, projects.hostname)
                       ELSE projects.hostname END,
                     token_sealed = COALESCE(excluded.token_sealed, projects.token_sealed),
                     webhook_secret_sealed = COALESCE(projects.webhook_secret_sealed,
                                                      excluded.webhook_secret_sealed),
                     updated_at = excluded.updated_at""",
                (
                    project_id,
                    digest,
                    hostname,
                    token_sealed,
                    new_webhook_secret_sealed,
                    time.time(),
                ),
            )
            _collect_replaced_config(conn, old, digest)

    def replace_webhook_secret(self, project_id: int, sealed: str) -> None:
        """A new secret for a project whose stored one the current key cannot open."""
        with self._write() as conn:
            conn.execute(
                "UPDATE projects SET webhook_secret_sealed = ? WHERE project_id = ?",
                (sealed, project_id),
            )

    def project(self, project_id: int) -> Project | None:
        row = (
            self._connection()
            .execute(
                """SELECT p.*, c.xml FROM projects p JOIN label_configs c USING (config_hash)
               WHERE project_id = ?""",
                (project_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Project(
            project_id=row["project_id"],
            label_config=row["xml"],
            hostname=row["hostname"],
            token_sealed=row["token_sealed"],
            webhook_secret_sealed=row["webhook_secret_sealed"],
            model_version=row["model_version"],
        )

    def project_ids(self) -> list[int]:
        rows = self._connection().execute("SELECT project_id FROM projects ORDER BY project_id")
        return [row[0] for row in rows]

    def set_project_model_version(self, project_id: int, model_version: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE projects SET model_version = ? WHERE project_id = ?",
                (model_version, project_id),
            )

    # -- annotations -------------------------------------------------------------------------

    def upsert_annotation(
        self, annotation: IncomingAnnotation, records: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """Store an annotation and its training records. Returns False for a stale delivery.

        ``records`` are ``(kind, payload)`` pairs from :mod:`rlhf_core.conversion`.
        """
        with self._write() as conn:
            current = conn.execute(
                """SELECT deleted, ls_updated_at, config_hash FROM annotations
                   WHERE project_id = ? AND annotation_id = ?""",
                (annotation.project_id, annotation.annotation_id),
            ).fetchone()
            if current is not None and (
                current["deleted"] or current["ls_updated_at"] > annotation.ls_updated_at
            ):
                return False
            digest = _put_config(conn, annotation.label_config)
            kinds = ",".join(sorted({kind for kind, _ in records}))
            conn.execute(
                """INSERT OR REPLACE INTO annotations(annotation_id, project_id, task_id, annotator,
                       config_hash, task_data, result, was_cancelled, ls_updated_at, deleted,
                       kinds, seq, stored_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)""",
                (
                    annotation.annotation_id,
                    annotation.project_id,
                    annotation.task_id,
                    annotation.annotator,
                    digest,
                    json.dumps(annotation.task_data),
                    json.dumps(annotation.result),
                    int(annotation.was_cancelled),
                    annotation.ls_updated_at,
                    kinds,
                    _next_seq(conn),
                    time.time(),
                ),
            )
            _replace_records(conn, annotation.annotation_id, annotation.project_id, records)
            if current is not None and current["config_hash"] not in (None, digest):
                _collect_config(conn, current["config_hash"])
            return True

    def delete_annotations(self, project_id: int, annotation_ids: list[int]) -> None:
        """Tombstone annotations (known or not yet seen) and drop their training records."""
        with self._write() as conn:
            for annotation_id in annotation_ids:
                conn.execute(
                    """INSERT INTO annotations(annotation_id, project_id, deleted, seq, stored_at)
                       VALUES (?, ?, 1, ?, ?)
                       ON CONFLICT(project_id, annotation_id) DO UPDATE SET
                         deleted = 1, kinds = '', seq = excluded.seq,
                         stored_at = excluded.stored_at""",
                    (annotation_id, project_id, _next_seq(conn), time.time()),
                )
                _replace_records(conn, annotation_id, project_id, [])

    def annotations(self, project_id: int) -> list[StoredAnnotation]:
        """Live (not deleted) annotations of a project, in id order."""
        rows = self._connection().execute(
            """SELECT * FROM annotations WHERE project_id = ? AND deleted = 0
               ORDER BY annotation_id""",
            (project_id,),
        )
        return [
            StoredAnnotation(
                annotation_id=row["annotation_id"],
                project_id=row["project_id"],
                task_id=row["task_id"],
                annotator=row["annotator"],
                task_data=json.loads(row["task_data"]),
                result=json.loads(row["result"]),
                was_cancelled=bool(row["was_cancelled"]),
                ls_updated_at=row["ls_updated_at"],
                kinds=tuple(k for k in row["kinds"].split(",") if k),
            )
            for row in rows
        ]

    def records(self, project_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Training records of a project (``kind``: ``preference`` or ``feedback``)."""
        query = "SELECT payload FROM records WHERE project_id = ?"
        params: tuple[Any, ...] = (project_id,)
        if kind is not None:
            query += " AND kind = ?"
            params += (kind,)
        rows = self._connection().execute(query + " ORDER BY record_id", params)
        return [json.loads(row[0]) for row in rows]

    def annotation_counts_by_kind(self) -> dict[str, int]:
        """Live annotations per record kind (``none`` for those that yield no training data)."""
        counts: dict[str, int] = {}
        rows = self._connection().execute(
            "SELECT kinds, COUNT(*) FROM annotations WHERE deleted = 0 GROUP BY kinds"
        )
        for kinds, n in rows:
            for kind in kinds.split(",") if kinds else ["none"]:
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def task_texts(self, project_id: int, task_id: int) -> set[str]:
        """The prompts and responses of a task's training records, as the reward model reads
        them (what a cache of embeddings is keyed by)."""
        rows = self._connection().execute(
            """SELECT r.payload FROM records r JOIN annotations a
               ON a.project_id = r.project_id AND a.annotation_id = r.annotation_id
               WHERE a.project_id = ? AND a.task_id = ?""",
            (project_id, task_id),
        )
        texts: set[str] = set()
        for (payload,) in rows:
            record = json.loads(payload)
            for key in ("prompt", "chosen", "rejected", "response"):
                if isinstance(record.get(key), str):
                    texts.add(record[key])
            for group in record.get("ranking") or []:  # a ranking record's responses
                texts.update(text for text in group if isinstance(text, str))
        return texts

    def forget_task(self, project_id: int, task_id: int) -> list[int]:
        """Erase a task's annotations (text, result, annotator) and training records.

        The annotation rows stay as tombstones, so a late webhook for them does not bring them
        back. SQLite overwrites the freed pages (``secure_delete``) and the WAL is truncated
        afterwards, so the text is gone from the files, not only from the tables. Returns the
        annotation ids that held the task.
        """
        conn = self._connection()
        conn.execute("PRAGMA secure_delete=ON")
        try:
            with self._write() as conn:
                ids = [
                    row[0]
                    for row in conn.execute(
                        """SELECT annotation_id FROM annotations
                           WHERE project_id = ? AND task_id = ? ORDER BY annotation_id""",
                        (project_id, task_id),
                    )
                ]
                for annotation_id in ids:
                    conn.execute(
                        """UPDATE annotations SET deleted = 1, task_data = NULL, result = NULL,
                               annotator = NULL, kinds = '', seq = ?, stored_at = ?
                           WHERE project_id = ? AND annotation_id = ?""",
                        (_next_seq(conn), time.time(), project_id, annotation_id),
                    )
                    _replace_records(conn, annotation_id, project_id, [])
                for table in ("task_models", "arena_responses"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE project_id = ? AND task_id = ?",
                        (project_id, task_id),
                    )
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:  # another connection is reading: the WAL is reused, not yet emptied
                logger.warning(
                    "forgot task %s, but the WAL could not be truncated now (another process "
                    "is reading); its old pages are overwritten as the WAL is reused",
                    task_id,
                )
        finally:
            conn.execute("PRAGMA secure_delete=OFF")
        return ids

    def note_task_models(
        self,
        project_id: int,
        task_id: int,
        generated_by: str | None = None,
        scored_by: str | None = None,
    ) -> None:
        """Remember which model version wrote a task's responses or scored it."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO task_models(project_id, task_id, generated_by, scored_by)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT(project_id, task_id) DO UPDATE SET
                     generated_by = COALESCE(excluded.generated_by, task_models.generated_by),
                     scored_by = COALESCE(excluded.scored_by, task_models.scored_by)""",
                (project_id, task_id, generated_by, scored_by),
            )

    def task_models(self, project_id: int) -> dict[int, tuple[str | None, str | None]]:
        """``{task: (generated_by, scored_by)}`` for the project's pre-annotated tasks."""
        rows = self._connection().execute(
            "SELECT task_id, generated_by, scored_by FROM task_models WHERE project_id = ?",
            (project_id,),
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    # -- training jobs -----------------------------------------------------------------------

    def enqueue_training(self, project_id: int, trigger: str, min_new: int = 0) -> Job | None:
        """Queue a training job unless one is already waiting (bursts coalesce into one job).

        With ``min_new`` > 0, queue only once that many usable annotations changed since the
        last job was queued. Returns the queued job, or None when nothing was queued.
        """
        return self.enqueue_job(project_id, JOB_TRAIN, trigger, min_new)

    def enqueue_job(self, project_id: int, kind: str, trigger: str, min_new: int = 0) -> Job | None:
        with self._write() as conn:
            waiting = conn.execute(
                "SELECT job_id FROM jobs WHERE project_id = ? AND kind = ? AND status = ?",
                (project_id, kind, JOB_QUEUED),
            ).fetchone()
            if waiting is not None:
                return None
            if min_new > 0 and _usable_changes_since_last_job(conn, project_id, kind) < min_new:
                return None
            cursor = conn.execute(
                """INSERT INTO jobs(project_id, kind, status, trigger, seq_at_enqueue, created_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (project_id, kind, JOB_QUEUED, trigger, _current_seq(conn), time.time()),
            )
            job_id = cursor.lastrowid
        logger.info("queued %s job %s for project %s (%s)", kind, job_id, project_id, trigger)
        return self.job(job_id)

    def claim_job(
        self, worker: str, kinds: tuple[str, ...] = (JOB_TRAIN, JOB_PREANNOTATE, JOB_RECONCILE)
    ) -> Job | None:
        """Take the oldest queued job whose project has no job of the same kind running."""
        marks = ",".join("?" * len(kinds))
        with self._write() as conn:
            row = conn.execute(
                f"""SELECT job_id FROM jobs j WHERE status = ? AND kind IN ({marks})
                    AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.status = ?
                                    AND r.project_id = j.project_id AND r.kind = j.kind)
                    ORDER BY job_id LIMIT 1""",
                (JOB_QUEUED, *kinds, JOB_RUNNING),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute(
                """UPDATE jobs SET status = ?, worker = ?, attempts = attempts + 1,
                       started_at = ?, heartbeat_at = ? WHERE job_id = ?""",
                (JOB_RUNNING, worker, now, now, row[0]),
            )
        return self.job(row[0])

    def start_job(self, project_id: int, kind: str, trigger: str, worker: str) -> Job | None:
        """A job run right here (the CLI): recorded as running unless one already runs."""
        with self._write() as conn:
            running = conn.execute(
                "SELECT job_id FROM jobs WHERE project_id = ? AND kind = ? AND status = ?",
                (project_id, kind, JOB_RUNNING),
            ).fetchone()
            if running is not None:
                return None
            now = time.time()
            cursor = conn.execute(
                """INSERT INTO jobs(project_id, kind, status, trigger, attempts, worker,
                       seq_at_enqueue, created_at, started_at, heartbeat_at)
                   VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)""",
                (project_id, kind, JOB_RUNNING, trigger, worker, _current_seq(conn), now, now, now),
            )
            job_id = cursor.lastrowid
        return self.job(job_id)

    def heartbeat(self, job_id: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE job_id = ?", (time.time(), job_id))

    def set_job_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        """What a running job is doing (phase, step, total, loss, eta_s), for ``/metrics``."""
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET progress = ? WHERE job_id = ?", (json.dumps(progress), job_id)
            )

    def running_progress(self) -> list[tuple[Job, dict[str, Any]]]:
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE status = ? AND progress IS NOT NULL ORDER BY job_id",
            (JOB_RUNNING,),
        )
        return [(_job(row), json.loads(row["progress"])) for row in rows]

    def finish_job(
        self, job_id: int, status: str, error: str | None = None, result: dict | None = None
    ) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE jobs SET status = ?, error = ?, result = ?, finished_at = ?
                   WHERE job_id = ?""",
                (status, error, json.dumps(result) if result else None, time.time(), job_id),
            )

    def recover_stale_jobs(self, stale_after_s: float, max_attempts: int) -> list[int]:
        """Running jobs whose worker stopped beating: queue them again, or fail them for good."""
        cutoff = time.time() - stale_after_s
        with self._write() as conn:
            rows = conn.execute(
                "SELECT job_id, attempts FROM jobs WHERE status = ? AND heartbeat_at < ?",
                (JOB_RUNNING, cutoff),
            ).fetchall()
            for job_id, attempts in rows:
                if attempts >= max_attempts:
                    conn.execute(
                        "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE job_id = ?",
                        (JOB_FAILED, "worker died; attempts exhausted", time.time(), job_id),
                    )
                else:
                    conn.execute(
                        "UPDATE jobs SET status = ?, error = ? WHERE job_id = ?",
                        (JOB_QUEUED, "worker died; retrying", job_id),
                    )
        return [row[0] for row in rows]

    def job(self, job_id: int | None) -> Job | None:
        row = (
            self._connection().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        )
        return _job(row) if row else None

    def jobs(self, project_id: int | None = None) -> list[Job]:
        query, params = "SELECT * FROM jobs", ()
        if project_id is not None:
            query, params = query + " WHERE project_id = ?", (project_id,)
        return [_job(row) for row in self._connection().execute(query + " ORDER BY job_id", params)]

    def seconds_since_job(self, project_id: int, kind: str) -> float | None:
        """Seconds since the project's newest job of ``kind`` was queued (None: never)."""
        row = (
            self._connection()
            .execute(
                "SELECT MAX(created_at) FROM jobs WHERE project_id = ? AND kind = ?",
                (project_id, kind),
            )
            .fetchone()
        )
        return None if row[0] is None else time.time() - row[0]

    def queue_depth(self) -> int:
        row = (
            self._connection()
            .execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (JOB_QUEUED, JOB_RUNNING))
            .fetchone()
        )
        return int(row[0])

    def model_versions(self) -> dict[int, str]:
        rows = self._connection().execute(
            "SELECT project_id, model_version FROM projects WHERE model_version IS NOT NULL"
        )
        return {row[0]: row[1] for row in rows}

    def job_history(self, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
        """A project's newest jobs, every column (times, progress, result), newest first."""
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE project_id = ? ORDER BY job_id DESC LIMIT ?",
            (project_id, limit),
        )
        history = []
        for row in rows:
            job = dict(row)
            for key in ("progress", "result"):
                job[key] = json.loads(job[key]) if job[key] else None
            history.append(job)
        return history

    def annotator_counts(self, project_id: int) -> dict[int | None, tuple[int, int]]:
        """Live annotations per annotator: (labels given, of which skipped)."""
        rows = self._connection().execute(
            """SELECT annotator, COUNT(*), SUM(was_cancelled) FROM annotations
               WHERE project_id = ? AND deleted = 0 GROUP BY annotator""",
            (project_id,),
        )
        return {row[0]: (int(row[1]), int(row[2] or 0)) for row in rows}

    # -- arena -------------------------------------------------------------------------------

    def replace_arena_responses(
        self, project_id: int, task_id: int, responses: list[dict[str, Any]]
    ) -> None:
        """Which version wrote each response of an arena task (replacing an earlier attempt's).

        ``responses``: ``{"text_hash", "policy_version", "chars", "rm_reward", "rm_version"}``.
        """
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "DELETE FROM arena_responses WHERE project_id = ? AND task_id = ?",
                (project_id, task_id),
            )
            conn.executemany(
                """INSERT OR REPLACE INTO arena_responses(project_id, task_id, text_hash,
                       policy_version, chars, rm_reward, rm_version, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        project_id,
                        task_id,
                        r["text_hash"],
                        r["policy_version"],
                        r["chars"],
                        r.get("rm_reward"),
                        r.get("rm_version"),
                        now,
                    )
                    for r in responses
                ],
            )

    def arena_responses(self, project_id: int) -> list[dict[str, Any]]:
        rows = self._connection().execute(
            "SELECT * FROM arena_responses WHERE project_id = ? ORDER BY task_id, text_hash",
            (project_id,),
        )
        return [dict(row) for row in rows]


def _stored_config_hash(conn: sqlite3.Connection, project_id: int) -> str | None:
    row = conn.execute(
        "SELECT config_hash FROM projects WHERE project_id = ?", (project_id,)
    ).fetchone()
    return None if row is None else row[0]


def _collect_replaced_config(conn: sqlite3.Connection, old: str | None, new: str) -> None:
    """Drop the project's previous config once nothing refers to it any more."""
    if old is not None and old != new:
        _collect_config(conn, old)


def _put_config(conn: sqlite3.Connection, xml: str) -> str:
    digest = config_hash(xml)
    conn.execute(
        "INSERT OR IGNORE INTO label_configs(config_hash, xml) VALUES (?, ?)", (digest, xml)
    )
    return digest


def _collect_config(conn: sqlite3.Connection, digest: str) -> None:
    """Drop a label config no project and no annotation refers to any more."""
    conn.execute(
        """DELETE FROM label_configs WHERE config_hash = ?
           AND NOT EXISTS (SELECT 1 FROM projects WHERE config_hash = ?)
           AND NOT EXISTS (SELECT 1 FROM annotations WHERE config_hash = ?)""",
        (digest, digest, digest),
    )


def _migrate_annotation_key(conn: sqlite3.Connection) -> None:
    """A store written when annotations were keyed by their id alone gets the (project, id)
    key: the table is rebuilt in the same transaction, rows and tombstones unchanged."""
    key = {row[1]: row[5] for row in conn.execute("PRAGMA table_info(annotations)")}
    if not key or key.get("project_id"):  # a new store, or already migrated
        return
    logger.info("store: keying annotations by (project, annotation id)")
    conn.execute("ALTER TABLE annotations RENAME TO annotations_by_id")
    conn.execute(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS annotations") :].split(";")[0])
    columns = ", ".join(key)
    conn.execute(f"INSERT INTO annotations({columns}) SELECT {columns} FROM annotations_by_id")
    conn.execute("DROP TABLE annotations_by_id")  # its indexes go with it; SCHEMA remakes them
    conn.execute("DROP INDEX IF EXISTS records_annotation")


def _replace_records(
    conn: sqlite3.Connection,
    annotation_id: int,
    project_id: int,
    records: list[tuple[str, dict[str, Any]]],
) -> None:
    conn.execute(
        "DELETE FROM records WHERE project_id = ? AND annotation_id = ?",
        (project_id, annotation_id),
    )
    conn.executemany(
        "INSERT INTO records(annotation_id, project_id, kind, payload) VALUES (?, ?, ?, ?)",
        [(annotation_id, project_id, kind, json.dumps(payload)) for kind, payload in records],
    )


def _current_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
    return int(row[0]) if row else 0


def _next_seq(conn: sqlite3.Connection) -> int:
    """A store-wide change counter: every annotation write gets a larger number."""
    value = _current_seq(conn) + 1
    conn.execute(
        "INSERT INTO counters(name, value) VALUES ('seq', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (value,),
    )
    return value


def _usable_changes_since_last_job(conn: sqlite3.Connection, project_id: int, kind: str) -> int:
    row = conn.execute(
        "SELECT MAX(seq_at_enqueue) FROM jobs WHERE project_id = ? AND kind = ?",
        (project_id, kind),
    ).fetchone()
    since = row[0] or 0
    row = conn.execute(
        """SELECT COUNT(*) FROM annotations
           WHERE project_id = ? AND deleted = 0 AND kinds != '' AND seq > ?""",
        (project_id, since),
    ).fetchone()
    return int(row[0])


def _job(row: sqlite3.Row) -> Job:
    return Job(
        job_id=row["job_id"],
        project_id=row["project_id"],
        kind=row["kind"],
        status=row["status"],
        trigger=row["trigger"],
        attempts=row["attempts"],
        error=row["error"],
        result=json.loads(row["result"]) if row["result"] else None,
    )
