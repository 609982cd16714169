"""The job worker: takes training and pre-annotation jobs from the durable store and runs them.

Outside the request path, always. ``rlhf-backend serve`` starts one (and restarts it if it
dies); ``rlhf-backend worker`` runs more. A job that raises is retried up to
``RLHF_JOB_MAX_ATTEMPTS`` times, then marked failed with its error; a job whose worker was
killed stops sending heartbeats and is picked up again by the next worker.

Between jobs a worker also does its chores: it retries the Label Studio syncs of promotions that
are due (:mod:`trainer.label_studio_sync`), and every ``RLHF_RECONCILE_EVERY_S`` it queues a
reconcile job for each connected project.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from rlhf_core.config import BackendConfig
from rlhf_core.db import database_for
from rlhf_core.store import JOB_DONE, JOB_FAILED, JOB_QUEUED, JOB_RECONCILE, Job, Store

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # at most; a quarter of RLHF_JOB_STALE_AFTER_S when that is shorter
Handler = Callable[[Job], dict[str, Any]]
Chore = Callable[[], None]


class Worker:
    def __init__(
        self,
        config: BackendConfig,
        handlers: dict[str, Handler],
        chores: list[Chore] | None = None,
    ) -> None:
        self.config = config
        self.store = Store(database_for(config)).initialize()
        self.handlers = handlers
        self.chores = chores or []
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()

    def run(self, once: bool = False, poll_s: float = 1.0) -> int:
        """Run jobs until stopped (with ``once``: until the queue is empty); returns jobs run."""
        done = 0
        logger.info("worker %s started", self.name)
        while not self.stopping.is_set():
            self.store.recover_stale_jobs(
                self.config.job_stale_after_s, self.config.job_max_attempts
            )
            self._do_chores()
            job = self.store.claim_job(self.name, tuple(self.handlers))
            if job is None:
                if once:
                    break
                self.stopping.wait(poll_s)
                continue
            self.run_job(job)
            done += 1
        logger.info("worker %s stopped after %d jobs", self.name, done)
        return done

    def run_job(self, job: Job) -> None:
        logger.info(
            "job %s: %s for project %s (attempt %d)",
            job.job_id,
            job.kind,
            job.project_id,
            job.attempts,
        )
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.job_id, beating), daemon=True)
        beat.start()
        try:
            result = self.handlers[job.kind](job)
        except Exception as exc:
            retry = job.attempts < self.config.job_max_attempts
            logger.error(
                "job %s failed (%s): %s", job.job_id, "will retry" if retry else "giving up", exc
            )
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.store.finish_job(job.job_id, JOB_QUEUED if retry else JOB_FAILED, error=error)
        else:
            self.store.finish_job(job.job_id, JOB_DONE, result=result)
            logger.info("job %s done: %s", job.job_id, result)
        finally:
            beating.set()
            beat.join()

    def _do_chores(self) -> None:
        for chore in self.chores:
            try:
                chore()
            except Exception:  # a chore is retried on the next round; the worker goes on
                logger.exception("worker %s: chore failed", self.name)

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        # Its own connection: this is another thread.
        store = Store(database_for(self.config))
        while not done.wait(heartbeat_interval_s(self.config)):
            store.heartbeat(job_id)
        store.close()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            logger.info("worker %s: signal %d, stopping after the current job", self.name, signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def heartbeat_interval_s(config: BackendConfig) -> float:
    """Beat often enough that a live job never looks stale, even with a short staleness."""
    return min(HEARTBEAT_S, config.job_stale_after_s / 4)


def default_handlers(config: BackendConfig) -> dict[str, Handler]:
    """The jobs this installation can run (imports models lazily, in the worker process)."""
    from trainer.jobs import preannotate_job, reconcile_job, train_job

    return {
        "train": lambda job: train_job(config, job),
        "preannotate": lambda job: preannotate_job(config, job),
        JOB_RECONCILE: lambda job: reconcile_job(config, job),
    }


def default_chores(config: BackendConfig) -> list[Chore]:
    """Retry due Label Studio syncs; queue reconcile jobs every ``RLHF_RECONCILE_EVERY_S``."""
    from trainer.jobs import registry_for
    from trainer.label_studio_sync import drain_syncs

    registry = registry_for(config)
    store = Store(database_for(config))
    last_reconcile = [time.monotonic()]

    def sync() -> None:
        drain_syncs(config, registry)

    def reconcile() -> None:
        if not config.reconcile_every_s:
            return
        if time.monotonic() - last_reconcile[0] < config.reconcile_every_s:
            return
        last_reconcile[0] = time.monotonic()
        for project_id in store.project_ids():
            store.enqueue_job(project_id, JOB_RECONCILE, trigger="schedule")

    return [sync, reconcile]


def supervise(command: list[str], stop: threading.Event, env: dict[str, str] | None = None) -> None:
    """Keep one embedded worker process alive next to the HTTP server (restarts it if it dies)."""
    import subprocess

    backoff = 1.0
    while not stop.is_set():
        started = time.monotonic()
        process = subprocess.Popen(command, env=env)
        while process.poll() is None:
            if stop.wait(1.0):
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                return
        logger.warning("embedded worker exited with %s; restarting", process.returncode)
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 60.0)
        stop.wait(backoff)
