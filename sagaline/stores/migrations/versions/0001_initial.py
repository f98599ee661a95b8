"""The initial schema: sagas, steps and the event history.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sagaline_sagas",
        sa.Column("saga_id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("output", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("failed_step", sa.String(200)),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sa.Column("deadline", sa.Double),
        sa.Column("due_at", sa.Double),
        sa.Column("parent_saga_id", sa.String(36)),
        sa.Column("parent_step", sa.String(200)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.UniqueConstraint("name", "idempotency_key", name="uq_sagaline_sagas_idempotency"),
        # Exact (case-sensitive) string comparison on MySQL/MariaDB, as on the other stores.
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_sagaline_sagas_created", "sagaline_sagas", ["created_at"])
    op.create_index("ix_sagaline_sagas_status_created", "sagaline_sagas", ["status", "created_at"])
    op.create_index("ix_sagaline_sagas_name_created", "sagaline_sagas", ["name", "created_at"])
    op.create_index("ix_sagaline_sagas_due", "sagaline_sagas", ["due_at"])
    op.create_index("ix_sagaline_sagas_parent", "sagaline_sagas", ["parent_saga_id"])
    op.create_table(
        "sagaline_steps",
        sa.Column("saga_id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("comp_status", sa.String(24)),
        sa.Column("comp_attempt", sa.Integer, nullable=False),
        sa.Column("output", sa.JSON),
        sa.Column("compensation_data", sa.JSON),
        sa.Column("has_compensation_data", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("comp_error", sa.Text),
        sa.Column("lease_until", sa.Double),
        sa.Column("due_at", sa.Double),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("version", sa.Integer, nullable=False),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_sagaline_steps_due", "sagaline_steps", ["due_at"])
    op.create_table(
        "sagaline_events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("step", sa.String(200)),
        sa.Column("attempt", sa.Integer),
        sa.Column("phase", sa.String(12)),
        sa.Column("detail", sa.JSON),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_sagaline_events_saga", "sagaline_events", ["saga_id", "seq"])


def downgrade() -> None:
    op.drop_table("sagaline_events")
    op.drop_table("sagaline_steps")
    op.drop_table("sagaline_sagas")
