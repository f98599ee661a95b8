"""Count the sweeper's re-publishes of a step's message, so that they back off.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "sagaline_steps", sa.Column("redispatches", sa.Integer, nullable=False, server_default="0")
    )


def downgrade() -> None:
    with op.batch_alter_table("sagaline_steps") as batch:
        batch.drop_column("redispatches")
