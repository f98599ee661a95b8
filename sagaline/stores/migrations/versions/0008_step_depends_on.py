"""Keep each step's dependencies with the saga, so that its graph is known without the
saga's definition (the dashboard draws it from the store).

Revision ID: 0008_step_depends_on
Revises: 0007_gc_finished_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_step_depends_on"
down_revision = "0007_gc_finished_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a saga started before this revision has no graph (drawn in step order).
    op.add_column("sagaline_steps", sa.Column("depends_on", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("sagaline_steps") as batch:
        batch.drop_column("depends_on")
