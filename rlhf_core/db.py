"""The one connection layer: a SQLAlchemy engine on SQLite (embedded, default) or PostgreSQL.

Every table of the backend (annotations, records, projects, jobs, the model registry, the Label
Studio outbox, ...) lives in the database ``RLHF_DATABASE_URL`` names; :class:`Database` hands out
transactions on it. What differs between the two backends stays here:

* **SQLite** (``sqlite:///path``) runs in WAL mode; a write transaction starts with ``BEGIN
  IMMEDIATE`` so concurrent writers queue up instead of failing half-way; ``synchronous`` is
  ``NORMAL`` or ``FULL`` (``RLHF_STORE_SYNC``); and a process may copy the WAL into the database
  from a background thread (``checkpoint_every_s``) instead of inside a request's commit. All of
  this is one machine's business: SQLite's WAL needs every process on one host.
* **PostgreSQL** (``postgresql://user@host:port/db``, the plain libpq URL: it is mapped to the
  psycopg 3 driver here) is for several machines. Writes that must not interleave take a
  transaction-scoped advisory lock (:meth:`Database.lock`), never a process-local one.

Times are seconds since the epoch **on the database's clock** (:class:`db_now`), so a worker
whose clock is skewed neither requeues a live job nor reorders promotions.

Engines are per process: a forked child never reuses its parent's connections.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Float, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

logger = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("normal", "full")


class DatabaseUrlError(ValueError):
    """``RLHF_DATABASE_URL`` names no database this backend can use; the message says why."""


class db_now(FunctionElement):
    """Seconds since the epoch, as a float, on the database server's clock."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    # clock_timestamp(), not now(): the time of this statement, not of the transaction's start.
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def normalize_url(url: str | Path) -> URL:
    """``sqlite:///path`` or a plain libpq ``postgresql://`` URL, as SQLAlchemy's URL with the
    psycopg 3 driver (a Path is a SQLite file).

    >>> normalize_url("postgresql://rlhf@db:5432/rlhf").render_as_string()
    'postgresql+psycopg://rlhf@db:5432/rlhf'
    >>> normalize_url("postgres://rlhf@db/rlhf").drivername
    'postgresql+psycopg'
    >>> normalize_url(Path("/data/store.sqlite3")).render_as_string()
    'sqlite:////data/store.sqlite3'
    """
    if isinstance(url, Path):
        return make_url(f"sqlite:///{url}")
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError: not even a URL
        raise DatabaseUrlError(f"RLHF_DATABASE_URL={_redacted(url)!r} is not a URL") from exc
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):  # the driver this backend ships: psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
        backend = "postgresql"
    elif backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise DatabaseUrlError(
                "RLHF_DATABASE_URL: a SQLite store is a file (sqlite:///path/store.sqlite3); "
                "every process must open the same one"
            )
    elif backend != "postgresql":
        raise DatabaseUrlError(
            f"RLHF_DATABASE_URL: {backend!r} is not supported; use sqlite:///path or "
            "postgresql://user@host:port/database"
        )
    return parsed


def _redacted(url: str) -> str:
    """A URL as it may appear in a message: never its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<not a URL>"


class Database:
    """One database, and this process's engine on it (created lazily, anew after a fork)."""

    def __init__(
        self,
        url: str | Path | URL,
        synchronous: str = "normal",
        checkpoint_every_s: float | None = None,
    ) -> None:
        """``synchronous`` and ``checkpoint_every_s``: SQLite only (see the module docstring)."""
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous={synchronous!r}: choose 'normal' or 'full'.")
        self.url = url if isinstance(url, URL) else normalize_url(url)
        self.synchronous = synchronous.upper()
        self.checkpoint_every_s = checkpoint_every_s
        self.dialect = self.url.get_backend_name()

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None on PostgreSQL."""
        return None if self.is_postgresql else Path(self.url.database or "")

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    # -- engine ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        key = (self.url.render_as_string(hide_password=False), self.synchronous)
        engine = _ENGINES.get(key)
        if engine is None:
            with _ENGINES_LOCK:
                engine = _ENGINES.get(key)
                if engine is None:
                    engine = self._create_engine()
                    _ENGINES[key] = engine
        if self.checkpoint_every_s is not None and not self.is_postgresql:
            _start_checkpointer(self.sqlite_path, self.checkpoint_every_s)
        return engine

    def _create_engine(self) -> Engine:
        if self.is_postgresql:
            return create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        path = self.sqlite_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, connect_args={"timeout": 30.0})
        synchronous = self.synchronous

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: sqlite3.Connection, _: Any) -> None:
            # Transactions are begun below, by us: pysqlite's own begins too late for a writer.
            dbapi_connection.isolation_level = None
            for pragma in ("journal_mode=WAL", f"synchronous={synchronous}", "busy_timeout=30000"):
                dbapi_connection.execute(f"PRAGMA {pragma}")
            if _CHECKPOINTERS.get(str(path)):
                dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("rlhf_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def dispose(self) -> None:
        """Close this process's pooled connections (tests; a command that is done)."""
        key = (self.url.render_as_string(hide_password=False), self.synchronous)
        with _ENGINES_LOCK:
            engine = _ENGINES.pop(key, None)
        if engine is not None:
            engine.dispose()

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed at the end (rolled back on an exception). On SQLite it
        holds the write lock from its first statement, so writers queue up."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(rlhf_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def erasing_write(self) -> Iterator[Connection]:
        """A write transaction whose deleted or overwritten values leave the database files, not
        only the tables. On SQLite the freed pages are zeroed (``secure_delete``) and the WAL is
        truncated after the commit; on PostgreSQL old row versions go at the next VACUUM."""
        if self.is_postgresql:
            with self.write() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection  # outside any transaction: autocommit
            assert dbapi is not None
            dbapi.execute("PRAGMA secure_delete=ON")
            try:
                with conn.execution_options(rlhf_write=True).begin():
                    yield conn
                busy = dbapi.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                dbapi.execute("PRAGMA secure_delete=OFF")
        if busy:  # another connection is reading: the WAL is reused, not yet emptied
            logger.warning(
                "the WAL could not be truncated now (another process is reading); its old "
                "pages are overwritten as the WAL is reused"
            )

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction. Its statements see one snapshot (SQLite; PostgreSQL at
        REPEATABLE READ), so a reader never sees half of a promotion."""
        with self.engine.connect() as conn:
            if self.is_postgresql:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def lock(self, conn: Connection, *key: Any) -> None:
        """Hold a lock named ``key`` until the transaction ends, on PostgreSQL (an advisory
        lock, shared by every machine). On SQLite a write transaction already holds the one
        database-wide write lock."""
        self.lock_all(conn, key)

    def lock_all(self, conn: Connection, *keys: tuple[Any, ...]) -> None:
        """:meth:`lock` for each key, in the order given, in one round trip."""
        if self.is_postgresql and keys:
            names = [f"pg_advisory_xact_lock(:key{i})" for i in range(len(keys))]
            params = {f"key{i}": advisory_key(*key) for i, key in enumerate(keys)}
            conn.execute(text(f"SELECT {', '.join(names)}"), params)

    def now(self) -> float:
        """The database's clock, in seconds since the epoch."""
        with self.engine.connect() as conn:
            return float(conn.execute(db_now().select()).scalar_one())


def advisory_key(*parts: Any) -> int:
    """A signed 64-bit key for ``pg_advisory_xact_lock``, from any tuple of names and ids."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_ENGINES: dict[tuple[str, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()
_CHECKPOINTERS: dict[str, threading.Thread] = {}


def _forget_engines_after_fork() -> None:
    """A forked child opens its own connections; the parent's stay the parent's (closing them
    here would close the parent's PostgreSQL sessions)."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()
    _CHECKPOINTERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_engines_after_fork)


def _start_checkpointer(path: Path | None, every_s: float) -> None:
    """Copy the WAL into the database from a background thread of this process, every
    ``every_s``, instead of inside whichever commit crosses SQLite's 1000-page mark (that
    commit would wait for the copy and its fsync: the request path's slowest moments)."""
    if path is None or str(path) in _CHECKPOINTERS:
        return
    with _ENGINES_LOCK:
        if str(path) in _CHECKPOINTERS:
            return
        thread = threading.Thread(
            target=_checkpoint_forever, args=(path, every_s), name="store-checkpoint", daemon=True
        )
        _CHECKPOINTERS[str(path)] = thread
    for engine in list(_ENGINES.values()):  # connections opened before now checkpoint no more
        if engine.url.database == str(path):
            engine.dispose()
    thread.start()


def _checkpoint_forever(path: Path, every_s: float) -> None:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    while True:
        time.sleep(every_s)
        try:  # PASSIVE: copies what no reader still needs, never blocks readers or writers
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.OperationalError as exc:  # e.g. another process's checkpoint runs
            logger.info("checkpoint skipped: %s", exc)


def as_database(
    target: Database | str | Path,
    synchronous: str = "normal",
    checkpoint_every_s: float | None = None,
) -> Database:
    """A :class:`Database` from itself, a URL, or the path of a SQLite file."""
    if isinstance(target, Database):
        return target
    return Database(target, synchronous, checkpoint_every_s)


def database_for(config: Any, checkpoint_every_s: float | None = None) -> Database:
    """The database a backend configuration names (``RLHF_DATABASE_URL``, else the SQLite store
    in ``RLHF_DATA_DIR``)."""
    return Database(config.resolved_database_url, config.store_sync, checkpoint_every_s)


def upsert(database: Database, table: Any) -> Any:
    """``INSERT ... ON CONFLICT`` for the database's dialect (the same API on both)."""
    return postgresql.insert(table) if database.is_postgresql else sqlite.insert(table)
