"""The SQL schema of the state store (SQLAlchemy Core), shared by the store and migrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..payload import MAX_KEY_LENGTH, MAX_NAME_LENGTH

# The Alembic revision this code expects; tests check it is the head of migrations/.
SCHEMA_REVISION = "0009_events_partitions"
VERSION_TABLE = "sagaline_alembic_version"

metadata = sa.MetaData()

sagas = sa.Table(
    "sagaline_sagas",
    metadata,
    sa.Column("saga_id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(MAX_NAME_LENGTH), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("output", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("failed_step", sa.String(MAX_NAME_LENGTH)),
    sa.Column("idempotency_key", sa.String(MAX_KEY_LENGTH)),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double),
    sa.Column("deadline", sa.Double),
    sa.Column("due_at", sa.Double),
    sa.Column("parent_saga_id", sa.String(36)),
    sa.Column("parent_step", sa.String(MAX_NAME_LENGTH)),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("input_fingerprint", sa.String(64)),
    sa.Column("trace_context", sa.String(128)),
    sa.UniqueConstraint("name", "idempotency_key", name="uq_sagaline_sagas_idempotency"),
    sa.Index("ix_sagaline_sagas_created", "created_at"),
    sa.Index("ix_sagaline_sagas_status_created", "status", "created_at"),
    sa.Index("ix_sagaline_sagas_name_created", "name", "created_at"),
    sa.Index("ix_sagaline_sagas_due", "due_at"),
    sa.Index("ix_sagaline_sagas_parent", "parent_saga_id"),
    # Retention (sql_gc.py): finished sagas of a status, oldest first.
    sa.Index("ix_sagaline_sagas_status_finished", "status", "finished_at"),
)

steps = sa.Table(
    "sagaline_steps",
    metadata,
    sa.Column("saga_id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(MAX_NAME_LENGTH), primary_key=True),
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
    sa.Column("redispatches", sa.Integer, nullable=False, server_default="0"),
    sa.Column("version", sa.Integer, nullable=False),
    # Who made the latest claim (records.Owner). With due_at (set while RUNNING) the
    # index finds one node's claims in flight without reading its finished steps.
    sa.Column("owner_node", sa.String(255)),
    sa.Column("owner_boot", sa.String(64)),
    sa.Column("owner_pid", sa.Integer),
    # The steps this one waits on (StepRecord.depends_on): a JSON list of names.
    sa.Column("depends_on", sa.JSON),
    sa.Index("ix_sagaline_steps_due", "due_at"),
    sa.Index("ix_sagaline_steps_owner", "owner_node", "due_at"),
)

# On PostgreSQL the table is partitioned by month of `ts` (migration 0009,
# pg_partitions.py): its primary key there is (saga_id, seq, ts), which also serves
# the history reads, and ix_sagaline_events_saga does not exist. `seq` stays unique
# (one sequence) and is what the statements here rely on.
events = sa.Table(
    "sagaline_events",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("step", sa.String(MAX_NAME_LENGTH)),
    sa.Column("attempt", sa.Integer),
    sa.Column("phase", sa.String(12)),
    sa.Column("detail", sa.JSON),
    sa.Index("ix_sagaline_events_saga", "saga_id", "seq"),
)

# -- the transactional outbox and the consumer inbox (sagaline/outbox/) ---------------

# Events written in the same transaction as the business change that caused them. A
# row is deleted once a destination confirmed it; `status` is "pending" or "dead".
outbox = sa.Table(
    "sagaline_outbox",
    metadata,
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
    sa.Index("ix_sagaline_outbox_status", "status", "id"),
    sa.Index("ix_sagaline_outbox_key", "key", "id"),
)

# One row per bucket of keys: a transaction that publishes with a key updates its
# bucket's row first, so transactions publishing one key commit one after the other
# and their rows' ids (taken after the lock) follow commit order. Fixed size: the
# migration inserts every bucket.
OUTBOX_KEY_BUCKETS = 4096
outbox_keys = sa.Table(
    "sagaline_outbox_keys",
    metadata,
    sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)

# Messages a consumer has processed, recorded in the consumer's own transaction.
inbox = sa.Table(
    "sagaline_inbox",
    metadata,
    sa.Column("consumer", sa.String(MAX_NAME_LENGTH), primary_key=True),
    sa.Column("message_id", sa.String(MAX_KEY_LENGTH), primary_key=True),
    sa.Column("received_at", sa.Double, nullable=False),
)


# MySQL/MariaDB compare strings case-insensitively by default (utf8mb4_general_ci):
# these tables say utf8mb4_bin so that idempotency keys and names compare exactly, as
# on every other store. The options are added when MySQL DDL is made (below, and in
# the migrations' environment), not in the tables above: naming a MySQL option loads
# SQLAlchemy's MySQL dialect (~1 MB) into every process, SQLite's and PostgreSQL's
# workers included.
MYSQL_TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
MYSQL_BINARY_TABLES = (sagas, steps, events, outbox, inbox)


def add_mysql_table_options() -> None:
    """Give the tables their MySQL character set and collation (idempotent)."""
    for table in MYSQL_BINARY_TABLES:
        table.dialect_kwargs.update(MYSQL_TABLE_OPTIONS)


@sa.event.listens_for(metadata, "before_create")
def _mysql_table_options(_target: sa.MetaData, connection: Any, **_: Any) -> None:
    if connection.dialect.name == "mysql":
        add_mysql_table_options()
