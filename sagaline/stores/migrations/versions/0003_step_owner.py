"""Record who claimed a step (node, boot, pid), so that a worker hands back the claims of
its dead processes at once instead of waiting for their leases.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sagaline_steps", sa.Column("owner_node", sa.String(255)))
    op.add_column("sagaline_steps", sa.Column("owner_boot", sa.String(64)))
    op.add_column("sagaline_steps", sa.Column("owner_pid", sa.Integer))
    op.create_index("ix_sagaline_steps_owner", "sagaline_steps", ["owner_node", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_sagaline_steps_owner", table_name="sagaline_steps")
    with op.batch_alter_table("sagaline_steps") as batch:
        batch.drop_column("owner_pid")
        batch.drop_column("owner_boot")
        batch.drop_column("owner_node")
