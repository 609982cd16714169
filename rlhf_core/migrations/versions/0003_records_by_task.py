"""Records keyed by their task: what ``/predict`` reads its tasks' labels through.

* ``records.task_id``: the task of the record's annotation (``annotations.task_id``, which the
  record's ``task`` field repeats), filled in here for the records already stored.
* ``records_task`` on (project_id, task_id, kind): :meth:`rlhf_core.store.Store.records` with
  ``tasks`` finds a request's records by lookup instead of reading every record of the project.
  A join through ``annotations`` would not: without statistics SQLite's planner walks the
  project's records of the kind through ``records_project`` and joins each one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("records", sa.Column("task_id", ID, nullable=True))
    records = sa.table(
        "records",
        sa.column("project_id", ID),
        sa.column("annotation_id", ID),
        sa.column("task_id", ID),
    )
    annotations = sa.table(
        "annotations",
        sa.column("project_id", ID),
        sa.column("annotation_id", ID),
        sa.column("task_id", ID),
    )
    owner_task = (
        sa.select(annotations.c.task_id)
        .where(
            annotations.c.project_id == records.c.project_id,
            annotations.c.annotation_id == records.c.annotation_id,
        )
        .scalar_subquery()
    )
    op.execute(sa.update(records).values(task_id=owner_task))
    op.create_index("records_task", "records", ["project_id", "task_id", "kind"])
    if op.get_bind().dialect.name == "postgresql":
        # Statistics on the new column now, not at autovacuum's next round: until then the
        # planner, knowing nothing of task_id, would filter the project's records instead.
        op.execute("ANALYZE records")


def downgrade() -> None:
    op.drop_index("records_task", table_name="records")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("task_id")
