"""The durable annotation store, on the database ``RLHF_DATABASE_URL`` names.

Every webhook the backend acknowledges is committed here first, so it survives ``kill -9`` of the
server. On SQLite (the default: one file under the data directory, in WAL mode) a commit is in
the WAL file before the answer goes out; ``synchronous`` is ``NORMAL`` by default (the WAL is
fsynced at checkpoints: an OS crash or power loss may lose the last commits, a killed process
never does) and ``FULL`` with ``RLHF_STORE_SYNC=full``. On PostgreSQL a commit is durable as the
server is configured to make it. Several gunicorn workers, job workers (on other machines too,
with PostgreSQL) and the CLI share the database; connections belong to one process
(:mod:`rlhf_core.db`).

State is kept equal to what Label Studio holds, whatever order deliveries arrive in:

* an annotation row is replaced only by a delivery whose Label Studio ``updated_at`` is not older
  than the stored one (a late ``ANNOTATION_CREATED`` does not undo an earlier-arrived update);
* a deletion leaves a tombstone, which no later create or update resurrects (Label Studio never
  reuses annotation ids);
* the training records derived from an annotation are replaced in the same transaction.

:class:`Store` is the annotations, their records and what pre-annotation and the arena noted per
task; the projects (:mod:`rlhf_core.projects`) and the job queue (:mod:`rlhf_core.job_queue`) are
parts of it that live in their own modules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from rlhf_core.db import Database, as_database, db_now, upsert
from rlhf_core.job_queue import (
    JOB_DONE,
    JOB_FAILED,
    JOB_PREANNOTATE,
    JOB_QUEUED,
    JOB_RECONCILE,
    JOB_RUNNING,
    JOB_TRAIN,
    Job,
    JobQueue,
    enqueue_in,
    enqueue_lock,
)
from rlhf_core.migrate import upgrade
from rlhf_core.projects import (
    CONTENT_LOCK,
    Project,
    ProjectStore,
    collect_config,
    config_hash,
    put_config,
)
from rlhf_core.schema import annotations_table, arena_responses, counters, records, task_models

__all__ = [
    "JOB_DONE",
    "JOB_FAILED",
    "JOB_PREANNOTATE",
    "JOB_QUEUED",
    "JOB_RECONCILE",
    "JOB_RUNNING",
    "JOB_TRAIN",
    "AnnotationWrite",
    "IncomingAnnotation",
    "Job",
    "Project",
    "Store",
    "StoredAnnotation",
    "config_hash",
]

logger = logging.getLogger(__name__)

# Task ids per statement when records are read by task: SQLite takes at most 999 bound
# variables in one statement (before 3.32), and /predict may name 20,000 tasks.
TASK_IDS_PER_QUERY = 900


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
class AnnotationWrite:
    """What :meth:`Store.store_annotation` did: stored (False: a stale or deleted one, the
    stored state kept), and the training job it queued, if any."""

    stored: bool
    job: Job | None = None


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


class Store(ProjectStore, JobQueue):
    """The store on ``target``: a :class:`~rlhf_core.db.Database`, a database URL, or the path of
    a SQLite file. Safe to share between threads; each process connects on its own."""

    def __init__(
        self,
        target: Database | str | Path,
        synchronous: str = "normal",
        checkpoint_every_s: float | None = None,
    ) -> None:
        """``synchronous``, ``checkpoint_every_s``: SQLite only (:class:`rlhf_core.db.Database`)."""
        self.db = as_database(target, synchronous, checkpoint_every_s)

    @property
    def path(self) -> Path | None:
        """The SQLite file (None on PostgreSQL)."""
        return self.db.sqlite_path

    def initialize(self, seal: Callable[[str], str | None] | None = None) -> Store:
        """Bring the schema to the newest revision (:func:`rlhf_core.migrate.upgrade`).
        ``seal``: how to keep the tokens an early version stored in plaintext (None from it
        drops a token); without it they wait for a process that has the key."""
        upgrade(self.db)
        if seal is not None:
            self.seal_plaintext_tokens(seal)
        return self

    def close(self) -> None:
        """Nothing to release: connections are pooled per process (``Database.dispose``)."""

    # -- annotations -------------------------------------------------------------------------

    def upsert_annotation(
        self, annotation: IncomingAnnotation, records: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """Store an annotation and its training records. Returns False for a stale delivery.

        ``records`` are ``(kind, payload)`` pairs from :mod:`rlhf_core.conversion`.
        """
        return self.store_annotation(annotation, records).stored

    def store_annotation(
        self,
        annotation: IncomingAnnotation,
        records: list[tuple[str, dict[str, Any]]],
        train_every: int = 0,
    ) -> AnnotationWrite:
        """Store an annotation and its training records and, with ``train_every`` > 0, queue a
        training once that many usable annotations changed since the last one was queued: all
        in one write transaction, so an acknowledged webhook has all of it and a failed one
        none. ``records`` are ``(kind, payload)`` pairs from :mod:`rlhf_core.conversion`,
        converted before the transaction opens (it holds the write lock)."""
        key = _annotation_key(annotation.project_id, annotation.annotation_id)
        locks = [CONTENT_LOCK]
        if train_every:
            locks.append(enqueue_lock(annotation.project_id, JOB_TRAIN))
        with self.db.write() as conn:
            self.db.lock_all(conn, *locks)
            current = (
                conn.execute(
                    select(
                        annotations_table.c.deleted,
                        annotations_table.c.ls_updated_at,
                        annotations_table.c.config_hash,
                    ).where(key)
                )
                .mappings()
                .first()
            )
            if current is not None and (
                current["deleted"] or current["ls_updated_at"] > annotation.ls_updated_at
            ):
                return AnnotationWrite(stored=False)
            digest = put_config(self.db, conn, annotation.label_config)
            values = {
                "task_id": annotation.task_id,
                "annotator": annotation.annotator,
                "config_hash": digest,
                "task_data": json.dumps(annotation.task_data),
                "result": json.dumps(annotation.result),
                "was_cancelled": int(annotation.was_cancelled),
                "ls_updated_at": annotation.ls_updated_at,
                "deleted": 0,
                "kinds": ",".join(sorted({kind for kind, _ in records})),
                "seq": _next_seq(self.db, conn),
                "stored_at": db_now(),
            }
            if current is None:
                conn.execute(
                    insert(annotations_table).values(
                        annotation_id=annotation.annotation_id,
                        project_id=annotation.project_id,
                        **values,
                    )
                )
            else:
                conn.execute(update(annotations_table).where(key).values(**values))
                _delete_records(conn, annotation.project_id, annotation.annotation_id)
                if current["config_hash"] not in (None, digest):
                    collect_config(conn, current["config_hash"])
            _insert_records(conn, annotation, records)
            job = (
                enqueue_in(conn, annotation.project_id, JOB_TRAIN, "annotations", train_every)
                if train_every
                else None
            )
        if job is not None:
            logger.info("queued train job %s for project %s", job.job_id, annotation.project_id)
        return AnnotationWrite(stored=True, job=job)

    def delete_annotations(self, project_id: int, annotation_ids: list[int]) -> None:
        """Tombstone annotations (known or not yet seen) and drop their training records."""
        with self.db.write() as conn:
            self.db.lock(conn, *CONTENT_LOCK)
            for annotation_id in annotation_ids:
                statement = upsert(self.db, annotations_table).values(
                    annotation_id=annotation_id,
                    project_id=project_id,
                    deleted=1,
                    seq=_next_seq(self.db, conn),
                    stored_at=db_now(),
                )
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[
                            annotations_table.c.project_id,
                            annotations_table.c.annotation_id,
                        ],
                        set_={
                            "deleted": 1,
                            "kinds": "",
                            "seq": statement.excluded.seq,
                            "stored_at": statement.excluded.stored_at,
                        },
                    )
                )
                _delete_records(conn, project_id, annotation_id)

    def annotations(self, project_id: int) -> list[StoredAnnotation]:
        """Live (not deleted) annotations of a project, in id order."""
        query = (
            select(annotations_table)
            .where(annotations_table.c.project_id == project_id, annotations_table.c.deleted == 0)
            .order_by(annotations_table.c.annotation_id)
        )
        with self.db.read() as conn:
            rows = conn.execute(query).mappings().all()
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

    def records(
        self, project_id: int, kind: str | None = None, tasks: Collection[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Training records of a project in the order they were stored (``kind``:
        ``preference``, ``ranking``, ``feedback`` or ``unpaired``).

        ``tasks``: only the records of these task ids (their annotation's task, which the
        record's ``task`` field repeats), looked up by index (``records_task``) instead of read
        from the whole project: what ``/predict`` asks for. An id that is not an integer
        (``"5"``) matches nothing, as ``5 in {"5"}`` is false; None matches the annotations
        Label Studio sent without a task.
        """
        query = select(records.c.record_id, records.c.payload).where(
            records.c.project_id == project_id
        )
        if kind is not None:
            query = query.where(records.c.kind == kind)
        # By task, no ORDER BY: SQLite would rather walk ``records_project`` in record order
        # than sort what ``records_task`` finds. The rows are put in stored order here.
        selections = [query.order_by(records.c.record_id)]
        if tasks is not None:
            selections = [query.where(match) for match in _task_matches(tasks)]
        rows: list[Any] = []
        with self.db.read() as conn:  # one snapshot for all the chunks
            for selection in selections:
                rows += conn.execute(selection).all()
        rows.sort(key=lambda row: row[0])
        return [json.loads(payload) for _, payload in rows]

    def annotation_counts_by_kind(self) -> dict[str, int]:
        """Live annotations per record kind (``none`` for those that yield no training data)."""
        counts: dict[str, int] = {}
        with self.db.read() as conn:
            rows = conn.execute(
                select(annotations_table.c.kinds, func.count())
                .where(annotations_table.c.deleted == 0)
                .group_by(annotations_table.c.kinds)
            ).all()
        for kinds, n in rows:
            for kind in kinds.split(",") if kinds else ["none"]:
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def annotator_counts(self, project_id: int) -> dict[int | None, tuple[int, int]]:
        """Live annotations per annotator: (labels given, of which skipped)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(
                    annotations_table.c.annotator,
                    func.count(),
                    func.sum(annotations_table.c.was_cancelled),
                )
                .where(
                    annotations_table.c.project_id == project_id, annotations_table.c.deleted == 0
                )
                .group_by(annotations_table.c.annotator)
            ).all()
        return {row[0]: (int(row[1]), int(row[2] or 0)) for row in rows}

    def task_texts(self, project_id: int, task_id: int) -> set[str]:
        """The prompts and responses of a task's training records, as the reward model reads
        them (what a cache of embeddings is keyed by)."""
        query = (
            select(records.c.payload)
            .join(
                annotations_table,
                (annotations_table.c.project_id == records.c.project_id)
                & (annotations_table.c.annotation_id == records.c.annotation_id),
            )
            .where(
                annotations_table.c.project_id == project_id, annotations_table.c.task_id == task_id
            )
        )
        with self.db.read() as conn:
            payloads = conn.execute(query).scalars().all()
        texts: set[str] = set()
        for payload in payloads:
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
        back. On SQLite the freed pages are overwritten (``secure_delete``) and the WAL is
        truncated afterwards, so the text is gone from the files, not only from the tables; on
        PostgreSQL the old row versions are gone from the files after the next VACUUM. Returns
        the annotation ids that held the task.
        """
        with self.db.erasing_write() as conn:
            self.db.lock(conn, *CONTENT_LOCK)
            ids = list(
                conn.execute(
                    select(annotations_table.c.annotation_id)
                    .where(
                        annotations_table.c.project_id == project_id,
                        annotations_table.c.task_id == task_id,
                    )
                    .order_by(annotations_table.c.annotation_id)
                ).scalars()
            )
            for annotation_id in ids:
                conn.execute(
                    update(annotations_table)
                    .where(_annotation_key(project_id, annotation_id))
                    .values(
                        deleted=1,
                        task_data=None,
                        result=None,
                        annotator=None,
                        kinds="",
                        seq=_next_seq(self.db, conn),
                        stored_at=db_now(),
                    )
                )
                _delete_records(conn, project_id, annotation_id)
            for table in (task_models, arena_responses):
                task = (table.c.project_id == project_id) & (table.c.task_id == task_id)
                conn.execute(delete(table).where(task))
        return ids

    def note_task_models(
        self,
        project_id: int,
        task_id: int,
        generated_by: str | None = None,
        scored_by: str | None = None,
    ) -> None:
        """Remember which model version wrote a task's responses or scored it."""
        statement = upsert(self.db, task_models).values(
            project_id=project_id, task_id=task_id, generated_by=generated_by, scored_by=scored_by
        )
        new = statement.excluded
        with self.db.write() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[task_models.c.project_id, task_models.c.task_id],
                    set_={
                        "generated_by": func.coalesce(new.generated_by, task_models.c.generated_by),
                        "scored_by": func.coalesce(new.scored_by, task_models.c.scored_by),
                    },
                )
            )

    def task_models(self, project_id: int) -> dict[int, tuple[str | None, str | None]]:
        """``{task: (generated_by, scored_by)}`` for the project's pre-annotated tasks."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(
                    task_models.c.task_id, task_models.c.generated_by, task_models.c.scored_by
                ).where(task_models.c.project_id == project_id)
            ).all()
        return {row[0]: (row[1], row[2]) for row in rows}

    # -- arena -------------------------------------------------------------------------------

    def replace_arena_responses(
        self, project_id: int, task_id: int, responses: list[dict[str, Any]]
    ) -> None:
        """Which version wrote each response of an arena task (replacing an earlier attempt's).

        ``responses``: ``{"text_hash", "policy_version", "chars", "rm_reward", "rm_version"}``.
        """
        by_hash = {r["text_hash"]: r for r in responses}  # a repeated text: the last one holds
        with self.db.write() as conn:
            now = conn.execute(db_now().select()).scalar_one()
            conn.execute(
                delete(arena_responses).where(
                    arena_responses.c.project_id == project_id,
                    arena_responses.c.task_id == task_id,
                )
            )
            if by_hash:
                conn.execute(
                    insert(arena_responses),
                    [
                        {
                            "project_id": project_id,
                            "task_id": task_id,
                            "text_hash": r["text_hash"],
                            "policy_version": r["policy_version"],
                            "chars": r["chars"],
                            "rm_reward": r.get("rm_reward"),
                            "rm_version": r.get("rm_version"),
                            "created_at": now,
                        }
                        for r in by_hash.values()
                    ],
                )

    def arena_responses(self, project_id: int) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(arena_responses)
                .where(arena_responses.c.project_id == project_id)
                .order_by(arena_responses.c.task_id, arena_responses.c.text_hash)
            ).mappings()
            return [dict(row) for row in rows]


def _task_matches(tasks: Collection[Any]) -> list[Any]:
    """Conditions on ``records.task_id`` that together match ``tasks`` as Python compares
    them (``2.0 == 2``; ``"2" != 2``): the integer ids, at most ``TASK_IDS_PER_QUERY`` in one,
    and None. No stored task id is a string, and bound against the integer column a string
    would fail the whole query on PostgreSQL (there is no ``bigint = varchar``)."""
    ids: set[int] = set()
    for task in tasks:
        if isinstance(task, float) and task.is_integer():
            task = int(task)
        if isinstance(task, int) and -(2**63) <= task < 2**63:
            ids.add(int(task))
    ordered = sorted(ids)
    task_id = records.c.task_id
    return [
        task_id.in_(ordered[start : start + TASK_IDS_PER_QUERY])
        for start in range(0, len(ordered), TASK_IDS_PER_QUERY)
    ] + ([task_id.is_(None)] if None in tasks else [])


def _annotation_key(project_id: int, annotation_id: int) -> Any:
    return (annotations_table.c.project_id == project_id) & (
        annotations_table.c.annotation_id == annotation_id
    )


def _delete_records(conn: Connection, project_id: int, annotation_id: int) -> None:
    conn.execute(
        delete(records).where(
            records.c.project_id == project_id, records.c.annotation_id == annotation_id
        )
    )


def _insert_records(
    conn: Connection, annotation: IncomingAnnotation, new: list[tuple[str, dict[str, Any]]]
) -> None:
    if new:
        conn.execute(
            insert(records),
            [
                {
                    "annotation_id": annotation.annotation_id,
                    "project_id": annotation.project_id,
                    "task_id": annotation.task_id,
                    "kind": kind,
                    "payload": json.dumps(payload),
                }
                for kind, payload in new
            ],
        )


def _next_seq(db: Database, conn: Connection) -> int:
    """A store-wide change counter: every annotation write gets a larger number (one atomic
    statement, so concurrent writers on PostgreSQL never share one)."""
    statement = upsert(db, counters).values(name="seq", value=1)
    statement = statement.on_conflict_do_update(
        index_elements=[counters.c.name], set_={"value": counters.c.value + 1}
    ).returning(counters.c.value)
    return int(conn.execute(statement).scalar_one())
