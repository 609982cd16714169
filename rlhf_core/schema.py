"""The tables, as SQLAlchemy Core sees them: what the queries are written against.

The schema itself is made and changed by the Alembic migrations in ``rlhf_core/migrations``
(``rlhf-backend migrate``); a test checks that these tables and the migrated database agree.
Times are seconds since the epoch on the database's clock (``rlhf_core.db.db_now``); JSON
columns are text written with ``json.dumps``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)

# Label Studio ids are 64-bit; on SQLite every INTEGER is, and ``INTEGER PRIMARY KEY`` must be
# spelled so to be the rowid.
ID = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

label_configs = Table(
    "label_configs",
    metadata,
    Column("config_hash", Text, primary_key=True),
    Column("xml", Text, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("project_id", ID, primary_key=True, autoincrement=False),
    Column("config_hash", Text, ForeignKey("label_configs.config_hash"), nullable=False),
    Column("hostname", Text),
    Column("access_token", Text),  # plaintext, from early versions: sealed and emptied on open
    Column("model_version", Text),
    Column("updated_at", Float, nullable=False),
    Column("token_sealed", Text),  # the Label Studio token that came with `hostname`, encrypted
    Column("webhook_secret_sealed", Text),  # the secret on the project's webhook, encrypted
)

annotations_table = Table(
    "annotations",
    metadata,
    Column("annotation_id", ID, nullable=False),
    Column("project_id", ID, nullable=False),
    Column("task_id", ID),
    Column("annotator", ID),
    Column("config_hash", Text, ForeignKey("label_configs.config_hash")),
    Column("task_data", Text),
    Column("result", Text),
    Column("was_cancelled", Integer, nullable=False, server_default="0"),
    Column("ls_updated_at", Text, nullable=False, server_default=""),
    Column("deleted", Integer, nullable=False, server_default="0"),
    Column("kinds", Text, nullable=False, server_default=""),
    Column("seq", ID, nullable=False),
    Column("stored_at", Float, nullable=False),
    # Label Studio numbers annotations per instance: the project is part of the key.
    PrimaryKeyConstraint("project_id", "annotation_id"),
)
Index("annotations_project", annotations_table.c.project_id, annotations_table.c.deleted)
Index("annotations_changes", annotations_table.c.project_id, annotations_table.c.seq)
Index("annotations_config", annotations_table.c.config_hash)

records = Table(
    "records",
    metadata,
    Column("record_id", ID, primary_key=True, autoincrement=True),
    Column("annotation_id", ID, nullable=False),
    Column("project_id", ID, nullable=False),
    Column("kind", Text, nullable=False),
    Column("payload", Text, nullable=False),
    # The annotation's task, kept beside its records so that /predict reads a task's records
    # by index (``records_task``): joined through annotations, SQLite's planner (it has no
    # statistics) walks every record of the project's kind through ``records_project``.
    Column("task_id", ID),
    sqlite_autoincrement=True,
)
Index("records_owner", records.c.project_id, records.c.annotation_id)
Index("records_project", records.c.project_id, records.c.kind)
Index("records_task", records.c.project_id, records.c.task_id, records.c.kind)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", ID, primary_key=True, autoincrement=True),
    Column("project_id", ID, nullable=False),
    Column("kind", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("result", Text),
    Column("worker", Text),
    Column("seq_at_enqueue", ID, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("heartbeat_at", Float),
    Column("finished_at", Float),
    Column("progress", Text),
    sqlite_autoincrement=True,
)
Index("jobs_status", jobs.c.status, jobs.c.project_id)
# At most one running job of a kind per project (one training at a time), held by the database.
RUNNING_JOB_WHERE = text("status = 'running'")
Index(
    "jobs_one_running",
    jobs.c.project_id,
    jobs.c.kind,
    unique=True,
    sqlite_where=RUNNING_JOB_WHERE,
    postgresql_where=RUNNING_JOB_WHERE,
)

task_models = Table(
    "task_models",
    metadata,
    Column("project_id", ID, primary_key=True, autoincrement=False),
    Column("task_id", ID, primary_key=True, autoincrement=False),
    Column("generated_by", Text),
    Column("scored_by", Text),
)

counters = Table(
    "counters",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", ID, nullable=False),
)

arena_responses = Table(
    "arena_responses",
    metadata,
    Column("project_id", ID, primary_key=True, autoincrement=False),
    Column("task_id", ID, primary_key=True, autoincrement=False),
    Column("text_hash", Text, primary_key=True),
    Column("policy_version", Text, nullable=False),
    Column("chars", Integer, nullable=False),
    Column("rm_reward", Float),
    Column("rm_version", Text),
    Column("created_at", Float, nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("project_id", ID, primary_key=True, autoincrement=False),
    Column("kind", Text, primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("version", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("config", Text, nullable=False),
    Column("data_snapshot", Text, nullable=False),
    Column("metrics", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("promoted_at", Float),
    Column("artifact_sha256", Text),  # the checkpoint's content hash, checked on load
)

# The Label Studio outbox: one row per promotion, done once Label Studio shows its version.
label_studio_syncs = Table(
    "label_studio_syncs",
    metadata,
    Column("sync_id", ID, primary_key=True, autoincrement=True),
    Column("project_id", ID, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("done_at", Float),
    sqlite_autoincrement=True,
)
Index("label_studio_syncs_status", label_studio_syncs.c.status, label_studio_syncs.c.project_id)

model_pins = Table(
    "model_pins",
    metadata,
    Column("project_id", ID, primary_key=True, autoincrement=False),
    Column("kind", Text, primary_key=True),
    Column("version", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("pinned_at", Float, nullable=False),
)

# Tables in an order that respects their foreign keys (copying a store into another database).
COPY_ORDER = [table.name for table in metadata.sorted_tables]
