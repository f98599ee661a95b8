"""Keep a saga's trace context, so that every span of a saga joins one trace.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a saga started without tracing (or before this revision) has none.
    op.add_column("sagaline_sagas", sa.Column("trace_context", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("sagaline_sagas") as batch:
        batch.drop_column("trace_context")
