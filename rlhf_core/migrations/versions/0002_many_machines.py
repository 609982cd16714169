"""Several machines on one database: one running job per (project, kind), artifact hashes.

* ``jobs_one_running``: a partial unique index, so the database itself refuses a second running
  job of a kind for a project (one training per project at a time, whichever machine claims).
* ``model_versions.artifact_sha256``: the content hash of a version's checkpoint, recorded when
  it is written and checked when it is loaded (NULL for versions recorded before).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("artifact_sha256", sa.Text, nullable=True))
    op.create_index(
        "jobs_one_running",
        "jobs",
        ["project_id", "kind"],
        unique=True,
        sqlite_where=RUNNING,
        postgresql_where=RUNNING,
    )


def downgrade() -> None:
    op.drop_index("jobs_one_running", table_name="jobs")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("artifact_sha256")
