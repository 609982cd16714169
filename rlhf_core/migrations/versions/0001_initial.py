"""The schema as the backend made it before Alembic; adopts such a store in place.

Stores written before migrations existed (no ``alembic_version`` table) had their tables made on
open, and some predate columns or keys added later. On such a store this revision only fills in
what is missing: it creates absent tables and indexes, adds absent columns and re-keys
annotations by (project, annotation id), keeping every row. On an empty database it creates
everything.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

logger = logging.getLogger(__name__)

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tables() -> dict[str, list]:
    """Each table's columns (and constraints), as of this revision."""
    return {
        "label_configs": [
            sa.Column("config_hash", sa.Text, primary_key=True),
            sa.Column("xml", sa.Text, nullable=False),
        ],
        "projects": [
            sa.Column("project_id", ID, primary_key=True, autoincrement=False),
            sa.Column(
                "config_hash", sa.Text, sa.ForeignKey("label_configs.config_hash"), nullable=False
            ),
            sa.Column("hostname", sa.Text),
            sa.Column("access_token", sa.Text),
            sa.Column("model_version", sa.Text),
            sa.Column("updated_at", sa.Float, nullable=False),
            sa.Column("token_sealed", sa.Text),
            sa.Column("webhook_secret_sealed", sa.Text),
        ],
        "annotations": [
            sa.Column("annotation_id", ID, nullable=False),
            sa.Column("project_id", ID, nullable=False),
            sa.Column("task_id", ID),
            sa.Column("annotator", ID),
            sa.Column("config_hash", sa.Text, sa.ForeignKey("label_configs.config_hash")),
            sa.Column("task_data", sa.Text),
            sa.Column("result", sa.Text),
            sa.Column("was_cancelled", sa.Integer, nullable=False, server_default="0"),
            sa.Column("ls_updated_at", sa.Text, nullable=False, server_default=""),
            sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
            sa.Column("kinds", sa.Text, nullable=False, server_default=""),
            sa.Column("seq", ID, nullable=False),
            sa.Column("stored_at", sa.Float, nullable=False),
            sa.PrimaryKeyConstraint("project_id", "annotation_id"),
        ],
        "records": [
            sa.Column("record_id", ID, primary_key=True, autoincrement=True),
            sa.Column("annotation_id", ID, nullable=False),
            sa.Column("project_id", ID, nullable=False),
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("payload", sa.Text, nullable=False),
        ],
        "jobs": [
            sa.Column("job_id", ID, primary_key=True, autoincrement=True),
            sa.Column("project_id", ID, nullable=False),
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("trigger", sa.Text, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("error", sa.Text),
            sa.Column("result", sa.Text),
            sa.Column("worker", sa.Text),
            sa.Column("seq_at_enqueue", ID, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float),
            sa.Column("heartbeat_at", sa.Float),
            sa.Column("finished_at", sa.Float),
            sa.Column("progress", sa.Text),
        ],
        "task_models": [
            sa.Column("project_id", ID, primary_key=True, autoincrement=False),
            sa.Column("task_id", ID, primary_key=True, autoincrement=False),
            sa.Column("generated_by", sa.Text),
            sa.Column("scored_by", sa.Text),
        ],
        "counters": [
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("value", ID, nullable=False),
        ],
        "arena_responses": [
            sa.Column("project_id", ID, primary_key=True, autoincrement=False),
            sa.Column("task_id", ID, primary_key=True, autoincrement=False),
            sa.Column("text_hash", sa.Text, primary_key=True),
            sa.Column("policy_version", sa.Text, nullable=False),
            sa.Column("chars", sa.Integer, nullable=False),
            sa.Column("rm_reward", sa.Float),
            sa.Column("rm_version", sa.Text),
            sa.Column("created_at", sa.Float, nullable=False),
        ],
        "model_versions": [
            sa.Column("project_id", ID, primary_key=True, autoincrement=False),
            sa.Column("kind", sa.Text, primary_key=True),
            sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("version", sa.Text, nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("reason", sa.Text),
            sa.Column("config", sa.Text, nullable=False),
            sa.Column("data_snapshot", sa.Text, nullable=False),
            sa.Column("metrics", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("promoted_at", sa.Float),
        ],
        "label_studio_syncs": [
            sa.Column("sync_id", ID, primary_key=True, autoincrement=True),
            sa.Column("project_id", ID, nullable=False),
            sa.Column("model_version", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("error", sa.Text),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("next_attempt_at", sa.Float, nullable=False),
            sa.Column("done_at", sa.Float),
        ],
        "model_pins": [
            sa.Column("project_id", ID, primary_key=True, autoincrement=False),
            sa.Column("kind", sa.Text, primary_key=True),
            sa.Column("version", sa.Text, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("pinned_at", sa.Float, nullable=False),
        ],
    }


AUTOINCREMENT = {"records", "jobs", "label_studio_syncs"}  # SQLite: never reuse a deleted id

INDEXES = [
    ("annotations_project", "annotations", ["project_id", "deleted"]),
    ("annotations_changes", "annotations", ["project_id", "seq"]),
    ("annotations_config", "annotations", ["config_hash"]),
    ("records_owner", "records", ["project_id", "annotation_id"]),
    ("records_project", "records", ["project_id", "kind"]),
    ("jobs_status", "jobs", ["status", "project_id"]),
    ("label_studio_syncs_status", "label_studio_syncs", ["status", "project_id"]),
]

# Columns added to tables after their first release (a store may predate them).
LATER_COLUMNS = {
    "jobs": ["progress"],
    "projects": ["token_sealed", "webhook_secret_sealed"],
}


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    if "annotations" in existing:
        _key_annotations_by_project(bind)
    tables = _tables()
    for name, columns in tables.items():
        if name not in existing:
            kwargs = {"sqlite_autoincrement": True} if name in AUTOINCREMENT else {}
            op.create_table(name, *columns, **kwargs)
            continue
        present = {column["name"] for column in sa.inspect(bind).get_columns(name)}
        for column in tables[name]:
            if column.name in LATER_COLUMNS.get(name, []) and column.name not in present:
                op.add_column(name, sa.Column(column.name, column.type))
    for index, table, columns in INDEXES:
        op.create_index(index, table, columns, if_not_exists=True)


def _key_annotations_by_project(bind: sa.Connection) -> None:
    """A store written when annotations were keyed by their id alone gets the (project, id)
    key: the table is rebuilt in this transaction, rows and tombstones unchanged (only SQLite
    stores are that old)."""
    key = sa.inspect(bind).get_pk_constraint("annotations")["constrained_columns"]
    if "project_id" in key:
        return
    logger.info("store: keying annotations by (project, annotation id)")
    columns = [c["name"] for c in sa.inspect(bind).get_columns("annotations")]
    op.rename_table("annotations", "annotations_by_id")
    for index in sa.inspect(bind).get_indexes("annotations_by_id"):
        if index["name"]:
            op.drop_index(index["name"])
    op.create_table("annotations", *_tables()["annotations"])
    listed = ", ".join(columns)
    op.execute(f"INSERT INTO annotations({listed}) SELECT {listed} FROM annotations_by_id")
    op.drop_table("annotations_by_id")
    op.execute("DROP INDEX IF EXISTS records_annotation")


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
