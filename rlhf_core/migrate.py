"""Schema migrations (Alembic, shipped in ``rlhf_core/migrations``) and copying a store.

:func:`upgrade` brings a database to the newest schema. ``rlhf-backend migrate`` runs it, and so
do ``serve`` and ``worker`` at start: it is idempotent, and safe when several processes start at
once (on PostgreSQL they queue on an advisory lock; on SQLite on the write lock), so the first
one migrates and the others find the schema current.

:func:`copy_store` moves an existing SQLite store (``rlhf-backend migrate --from
sqlite:///path``) into another database, PostgreSQL typically: every table, rows unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, insert, inspect, select, text

from rlhf_core import schema
from rlhf_core.db import Database

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
COPY_BATCH_ROWS = 1000
_CURRENT: set[str] = set()  # databases this process has seen at the newest revision


class MigrationError(RuntimeError):
    """The database cannot be migrated or copied as asked; the message says why."""


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(database: Database) -> str:
    """Bring ``database`` to the newest schema (a no-op when it is there); returns the revision."""
    key = database.url.render_as_string(hide_password=False)
    head = head_revision()
    if key in _CURRENT:
        return head
    with database.write() as conn:
        database.lock(conn, "rlhf-backend migrations")
        before = current_revision(conn)
        if before != head:
            config = _alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            logger.info("database %r: schema %s -> %s", database, before or "(none)", head)
    _CURRENT.add(key)
    return head


def copy_store(source: Database, target: Database) -> dict[str, int]:
    """Copy every table of ``source`` into ``target`` (both migrated first); returns rows per
    table. The target must hold no store yet: nothing is merged or overwritten."""
    if source.url == target.url:
        raise MigrationError("--from names the database RLHF_DATABASE_URL already names")
    upgrade(source)
    upgrade(target)
    counts: dict[str, int] = {}
    with source.read() as reader, target.write() as writer:
        target.lock(writer, "rlhf-backend migrations")
        occupied = [
            table
            for table in schema.COPY_ORDER
            if writer.execute(
                select(func.count()).select_from(schema.metadata.tables[table])
            ).scalar_one()
        ]
        if occupied:
            raise MigrationError(
                f"{target!r} already holds a store (rows in {', '.join(occupied)}); copy into an "
                "empty database"
            )
        for name in schema.COPY_ORDER:
            counts[name] = _copy_table(reader, writer, schema.metadata.tables[name])
        if target.is_postgresql:
            _advance_sequences(writer)
    logger.info("copied %s into %r: %s", source, target, counts)
    return counts


def _copy_table(reader: Connection, writer: Connection, table: Any) -> int:
    present = {column["name"] for column in inspect(reader).get_columns(table.name)}
    columns = [column for column in table.columns if column.name in present]
    rows = reader.execute(select(*columns))
    copied = 0
    while batch := rows.fetchmany(COPY_BATCH_ROWS):
        writer.execute(insert(table), [dict(row._mapping) for row in batch])
        copied += len(batch)
    return copied


def _advance_sequences(writer: Connection) -> None:
    """Ids generated after the copy continue after the copied ones."""
    for table, column in (
        ("records", "record_id"),
        ("jobs", "job_id"),
        ("label_studio_syncs", "sync_id"),
    ):
        writer.execute(
            text(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
            )
        )
