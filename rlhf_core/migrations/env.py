"""Alembic's entry point: migrations run on the connection ``rlhf_core.migrate`` hands over.

``rlhf-backend migrate`` (and ``serve`` / ``worker`` at start) call
:func:`rlhf_core.migrate.upgrade`, which holds the migration lock and passes its connection in
``config.attributes``.
"""

from __future__ import annotations

from alembic import context

from rlhf_core.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `rlhf-backend migrate`, not the alembic command")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
