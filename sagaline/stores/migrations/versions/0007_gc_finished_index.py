"""Retention (`sagaline gc`) finds finished sagas by status and end time through an index.

Revision ID: 0007_gc_finished_index
Revises: 0006_outbox
"""

from __future__ import annotations

from alembic import op

revision = "0007_gc_finished_index"
down_revision = "0006_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_sagaline_sagas_status_finished", "sagaline_sagas", ["status", "finished_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_sagaline_sagas_status_finished", table_name="sagaline_sagas")
