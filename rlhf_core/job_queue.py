"""The job queue: training, pre-annotation and reconcile jobs, as rows of the ``jobs`` table.

Workers on any number of machines share it through the database:

* a claim takes the oldest queued job whose project runs no job of its kind, with ``SELECT ...
  FOR UPDATE SKIP LOCKED`` on PostgreSQL (two claimers never take one job, and neither waits
  for the other), under SQLite's write lock on SQLite;
* at most one job of a kind runs per project (one training at a time): the claim's condition,
  and behind it the partial unique index ``jobs_one_running`` that the database enforces
  whichever machine claims;
* heartbeats and staleness are measured on the database's clock, so a worker whose clock is
  skewed neither makes a live job look dead nor keeps a dead one alive.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, RowMapping, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from rlhf_core.db import Database, db_now
from rlhf_core.schema import annotations_table, counters, jobs

logger = logging.getLogger(__name__)

JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED = "queued", "running", "done", "failed"
JOB_TRAIN, JOB_PREANNOTATE, JOB_RECONCILE = "train", "preannotate", "reconcile"
ALL_KINDS = (JOB_TRAIN, JOB_PREANNOTATE, JOB_RECONCILE)
CLAIM_TRIES = 5  # a claim that lost a race for a project's one running slot tries again


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


class JobQueue:
    """The ``jobs`` table of ``self.db``: queue, claim, heartbeat, finish, recover."""

    db: Database

    def enqueue_training(self, project_id: int, trigger: str, min_new: int = 0) -> Job | None:
        """Queue a training job unless one is already waiting (bursts coalesce into one job).

        With ``min_new`` > 0, queue only once that many usable annotations changed since the
        last job was queued. Returns the queued job, or None when nothing was queued.
        """
        return self.enqueue_job(project_id, JOB_TRAIN, trigger, min_new)

    def enqueue_job(self, project_id: int, kind: str, trigger: str, min_new: int = 0) -> Job | None:
        with self.db.write() as conn:
            self.db.lock(conn, *enqueue_lock(project_id, kind))
            job = enqueue_in(conn, project_id, kind, trigger, min_new)
        if job is not None:
            logger.info(
                "queued %s job %s for project %s (%s)", kind, job.job_id, project_id, trigger
            )
        return job

    def claim_job(self, worker: str, kinds: tuple[str, ...] = ALL_KINDS) -> Job | None:
        """Take the oldest queued job whose project has no job of the same kind running."""
        for _ in range(CLAIM_TRIES):
            try:
                job_id = self._claim_once(worker, kinds)
            except IntegrityError:  # another machine started this project's job first
                logger.info("claim lost a race for a project's running slot; trying again")
                continue
            return None if job_id is None else self.job(job_id)
        return None

    def _claim_once(self, worker: str, kinds: tuple[str, ...]) -> int | None:
        running = jobs.alias("running")
        query = (
            select(jobs.c.job_id)
            .where(
                jobs.c.status == JOB_QUEUED,
                jobs.c.kind.in_(kinds),
                ~exists().where(
                    running.c.status == JOB_RUNNING,
                    running.c.project_id == jobs.c.project_id,
                    running.c.kind == jobs.c.kind,
                ),
            )
            .order_by(jobs.c.job_id)
            .limit(1)
        )
        if self.db.is_postgresql:
            query = query.with_for_update(skip_locked=True, of=jobs)
        with self.db.write() as conn:
            job_id = conn.execute(query).scalar()
            if job_id is None:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.job_id == job_id)
                .values(
                    status=JOB_RUNNING,
                    worker=worker,
                    attempts=jobs.c.attempts + 1,
                    started_at=db_now(),
                    heartbeat_at=db_now(),
                )
            )
        return int(job_id)

    def start_job(self, project_id: int, kind: str, trigger: str, worker: str) -> Job | None:
        """A job run right here (the CLI): recorded as running unless one already runs."""
        try:
            with self.db.write() as conn:
                if _has_job(conn, project_id, kind, JOB_RUNNING):
                    return None
                job_id = _insert_job(
                    conn,
                    project_id,
                    kind,
                    trigger,
                    status=JOB_RUNNING,
                    attempts=1,
                    worker=worker,
                    started_at=db_now(),
                    heartbeat_at=db_now(),
                )
        except IntegrityError:  # a worker elsewhere claimed one in the meantime
            return None
        return self.job(job_id)

    def heartbeat(self, job_id: int) -> None:
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(heartbeat_at=db_now()))

    def set_job_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        """What a running job is doing (phase, step, total, loss, eta_s), for ``/metrics``."""
        with self.db.write() as conn:
            conn.execute(
                update(jobs).where(jobs.c.job_id == job_id).values(progress=json.dumps(progress))
            )

    def running_progress(self) -> list[tuple[Job, dict[str, Any]]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(jobs)
                .where(jobs.c.status == JOB_RUNNING, jobs.c.progress.is_not(None))
                .order_by(jobs.c.job_id)
            ).mappings()
            return [(_job(row), json.loads(row["progress"])) for row in rows]

    def finish_job(
        self, job_id: int, status: str, error: str | None = None, result: dict | None = None
    ) -> None:
        with self.db.write() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.job_id == job_id)
                .values(
                    status=status,
                    error=error,
                    result=json.dumps(result) if result else None,
                    finished_at=db_now(),
                )
            )

    def recover_stale_jobs(self, stale_after_s: float, max_attempts: int) -> list[int]:
        """Running jobs whose worker stopped beating (on the database's clock): queue them
        again, or fail them for good once ``max_attempts`` runs were spent."""
        stale = (jobs.c.status == JOB_RUNNING) & (
            jobs.c.heartbeat_at < db_now() - float(stale_after_s)
        )
        with self.db.write() as conn:
            failed = conn.execute(
                update(jobs)
                .where(stale, jobs.c.attempts >= max_attempts)
                .values(
                    status=JOB_FAILED,
                    error="worker died; attempts exhausted",
                    finished_at=db_now(),
                )
                .returning(jobs.c.job_id)
            ).scalars()
            recovered = list(failed)
            requeued = conn.execute(
                update(jobs)
                .where(stale)
                .values(status=JOB_QUEUED, error="worker died; retrying")
                .returning(jobs.c.job_id)
            ).scalars()
            recovered += list(requeued)
        return sorted(recovered)

    def job(self, job_id: int | None) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_id == job_id)).mappings().first()
        return _job(row) if row else None

    def jobs(self, project_id: int | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.job_id)
        if project_id is not None:
            query = query.where(jobs.c.project_id == project_id)
        with self.db.read() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def seconds_since_job(self, project_id: int, kind: str) -> float | None:
        """Seconds since the project's newest job of ``kind`` was queued (None: never)."""
        with self.db.read() as conn:
            age = conn.execute(
                select(db_now() - func.max(jobs.c.created_at)).where(
                    jobs.c.project_id == project_id, jobs.c.kind == kind
                )
            ).scalar()
        return None if age is None else float(age)

    def queue_depth(self) -> int:
        with self.db.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(jobs.c.status.in_((JOB_QUEUED, JOB_RUNNING)))
                ).scalar_one()
            )

    def job_history(self, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
        """A project's newest jobs, every column (times, progress, result), newest first."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(jobs)
                .where(jobs.c.project_id == project_id)
                .order_by(jobs.c.job_id.desc())
                .limit(limit)
            ).mappings()
            history = [dict(row) for row in rows]
        for job in history:
            for key in ("progress", "result"):
                job[key] = json.loads(job[key]) if job[key] else None
        return history


def enqueue_lock(project_id: int, kind: str) -> tuple[Any, ...]:
    """The lock (:meth:`~rlhf_core.db.Database.lock`) that coalesces a project's queued jobs of
    a kind across machines; whoever enqueues holds it."""
    return ("enqueue", project_id, kind)


def enqueue_in(
    conn: Connection, project_id: int, kind: str, trigger: str, min_new: int = 0
) -> Job | None:
    """:meth:`JobQueue.enqueue_job` inside the caller's write transaction, which holds
    :func:`enqueue_lock`: one statement to decide, one to insert (returning the job)."""
    queued = exists().where(
        jobs.c.project_id == project_id, jobs.c.kind == kind, jobs.c.status == JOB_QUEUED
    )
    if min_new > 0:
        since = (
            select(func.max(jobs.c.seq_at_enqueue))
            .where(jobs.c.project_id == project_id, jobs.c.kind == kind)
            .scalar_subquery()
        )
        changed = (
            select(func.count())
            .where(
                annotations_table.c.project_id == project_id,
                annotations_table.c.deleted == 0,
                annotations_table.c.kinds != "",
                annotations_table.c.seq > func.coalesce(since, 0),
            )
            .scalar_subquery()
        )
        has_queued, usable = conn.execute(select(queued, changed)).one()
        if has_queued or usable < min_new:
            return None
    elif conn.execute(select(queued)).scalar():
        return None
    row = conn.execute(
        _insert_job_statement(project_id, kind, trigger, status=JOB_QUEUED).returning(*jobs.c)
    ).mappings()
    return _job(row.one())


def _insert_job_statement(project_id: int, kind: str, trigger: str, **values: Any) -> Insert:
    seq = select(counters.c.value).where(counters.c.name == "seq").scalar_subquery()
    return insert(jobs).values(
        project_id=project_id,
        kind=kind,
        trigger=trigger,
        seq_at_enqueue=func.coalesce(seq, 0),
        created_at=db_now(),
        **values,
    )


def _insert_job(conn: Connection, project_id: int, kind: str, trigger: str, **values: Any) -> int:
    statement = _insert_job_statement(project_id, kind, trigger, **values)
    return int(conn.execute(statement.returning(jobs.c.job_id)).scalar_one())


def _has_job(conn: Connection, project_id: int, kind: str, status: str) -> bool:
    found = conn.execute(
        select(jobs.c.job_id).where(
            jobs.c.project_id == project_id, jobs.c.kind == kind, jobs.c.status == status
        )
    ).first()
    return found is not None


def _job(row: RowMapping) -> Job:
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
