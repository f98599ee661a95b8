"""Keep a hash of a saga's input with its idempotency key, to tell a replay from a conflict.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: sagas started before this revision have no fingerprint, and a run()
    # with their key returns them as it did then.
    op.add_column("sagaline_sagas", sa.Column("input_fingerprint", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("sagaline_sagas") as batch:
        batch.drop_column("input_fingerprint")
