"""The transactional outbox (events committed with the business change) and the inbox.

Revision ID: 0006_outbox
Revises: 0005
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006_outbox"
down_revision = "0005"
branch_labels = None
depends_on = None

MAX_NAME_LENGTH = 200
MAX_KEY_LENGTH = 255
KEY_BUCKETS = 4096
TABLE_OPTIONS: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

# PostgreSQL wakes relays at commit: one notification per inserting statement
# (identical notifications of one transaction are delivered once).
PG_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION sagaline_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('sagaline_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
PG_NOTIFY_TRIGGER = """
CREATE TRIGGER sagaline_outbox_notify AFTER INSERT ON sagaline_outbox
FOR EACH STATEMENT EXECUTE FUNCTION sagaline_outbox_notify()
"""


def upgrade() -> None:
    op.create_table(
        "sagaline_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("event_id", sa.String(MAX_KEY_LENGTH), nullable=False),
        sa.Column("topic", sa.String(MAX_NAME_LENGTH), nullable=False),
        sa.Column("key", sa.String(MAX_KEY_LENGTH)),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("headers", sa.JSON),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("available_at", sa.Double, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.UniqueConstraint("event_id", name="uq_sagaline_outbox_event"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_sagaline_outbox_status", "sagaline_outbox", ["status", "id"])
    op.create_index("ix_sagaline_outbox_key", "sagaline_outbox", ["key", "id"])
    keys = op.create_table(
        "sagaline_outbox_keys",
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(keys, [{"bucket": b, "n": 0} for b in range(KEY_BUCKETS)])
    op.create_table(
        "sagaline_inbox",
        sa.Column("consumer", sa.String(MAX_NAME_LENGTH), primary_key=True),
        sa.Column("message_id", sa.String(MAX_KEY_LENGTH), primary_key=True),
        sa.Column("received_at", sa.Double, nullable=False),
        **TABLE_OPTIONS,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_NOTIFY_FUNCTION)
        op.execute(PG_NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS sagaline_outbox_notify ON sagaline_outbox")
        op.execute("DROP FUNCTION IF EXISTS sagaline_outbox_notify()")
    op.drop_table("sagaline_inbox")
    op.drop_table("sagaline_outbox_keys")
    op.drop_table("sagaline_outbox")
