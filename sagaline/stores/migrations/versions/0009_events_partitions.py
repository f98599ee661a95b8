"""Partition PostgreSQL's event history by month, so that retention drops whole months.

The table is rebuilt as `PARTITION BY RANGE (ts)`, with a partition for every month
that has events, for this month and the AHEAD_MONTHS next ones, and a DEFAULT one;
the rows are copied in (each routed to its month) and the old table dropped, all in
the migration's transaction.
Its sequence carries on, so the `seq` of new events stays above every old one.

A partitioned table's primary key must hold the partition key: it becomes
(saga_id, seq, ts), which also serves the history reads (saga_id, seq > n ORDER BY seq)
that the index ix_sagaline_events_saga served, so that index goes.

MySQL/MariaDB and SQLite keep their table as it is: a no-op there.

Revision ID: 0009_events_partitions
Revises: 0008_step_depends_on
"""

from __future__ import annotations

import time
from datetime import timezone

from alembic import op

from sagaline.stores.pg_partitions import (
    AHEAD_MONTHS,
    DEFAULT_PARTITION,
    add_months,
    create_month,
    month_start,
)

revision = "0009_events_partitions"
down_revision = "0008_step_depends_on"
branch_labels = None
depends_on = None

OLD = "sagaline_events_unpartitioned"
MAX_PAST_MONTHS = 240
COLUMNS = "seq, saga_id, ts, kind, step, attempt, phase, detail"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # The sequence of `seq` (BIGSERIAL's), whatever it was named: the new table takes it over.
    sequence = bind.exec_driver_sql(
        "SELECT pg_get_serial_sequence('sagaline_events', 'seq')"
    ).scalar_one()
    op.execute(f"ALTER TABLE sagaline_events RENAME TO {OLD}")
    _rename_primary_key(OLD)
    op.execute("DROP INDEX ix_sagaline_events_saga")
    op.execute(f"""
        CREATE TABLE sagaline_events (
            seq BIGINT NOT NULL DEFAULT nextval('{sequence}'),
            saga_id VARCHAR(36) NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            kind VARCHAR(40) NOT NULL,
            step VARCHAR(200),
            attempt INTEGER,
            phase VARCHAR(12),
            detail JSON,
            CONSTRAINT sagaline_events_pkey PRIMARY KEY (saga_id, seq, ts)
        ) PARTITION BY RANGE (ts)""")
    op.execute(f"ALTER SEQUENCE {sequence} OWNED BY sagaline_events.seq")
    op.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF sagaline_events DEFAULT")
    # A partition for every month that has events (the newest MAX_PAST_MONTHS of them:
    # a clock gone wrong should not create a thousand tables; older rows stay in
    # DEFAULT), and for this month and the next ones.
    held = bind.exec_driver_sql(
        "SELECT DISTINCT date_trunc('month', to_timestamp(ts) AT TIME ZONE 'UTC') AS m "
        f"FROM {OLD} ORDER BY m DESC LIMIT {MAX_PAST_MONTHS}"
    ).scalars()
    now = month_start(time.time())
    months = {m.replace(tzinfo=timezone.utc) for m in held}
    months.update(add_months(now, k) for k in range(AHEAD_MONTHS + 1))
    for month in sorted(months):
        create_month(bind, month)
    op.execute(f"INSERT INTO sagaline_events ({COLUMNS}) SELECT {COLUMNS} FROM {OLD}")
    op.execute(f"DROP TABLE {OLD}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    sequence = bind.exec_driver_sql(
        "SELECT pg_get_serial_sequence('sagaline_events', 'seq')"
    ).scalar_one()
    op.execute("ALTER TABLE sagaline_events RENAME TO sagaline_events_partitioned")
    _rename_primary_key("sagaline_events_partitioned")
    op.execute(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
    op.execute(f"""
        CREATE TABLE sagaline_events (
            seq BIGINT NOT NULL DEFAULT nextval('{sequence}'),
            saga_id VARCHAR(36) NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            kind VARCHAR(40) NOT NULL,
            step VARCHAR(200),
            attempt INTEGER,
            phase VARCHAR(12),
            detail JSON,
            CONSTRAINT sagaline_events_pkey PRIMARY KEY (seq)
        )""")
    op.execute(f"ALTER SEQUENCE {sequence} OWNED BY sagaline_events.seq")
    op.execute(
        f"INSERT INTO sagaline_events ({COLUMNS}) SELECT {COLUMNS} FROM sagaline_events_partitioned"
    )
    op.execute("DROP TABLE sagaline_events_partitioned")
    op.execute("CREATE INDEX ix_sagaline_events_saga ON sagaline_events (saga_id, seq)")


def _rename_primary_key(table: str) -> None:
    """Free the name sagaline_events_pkey (an index name, unique in the schema) for the
    table that takes the name sagaline_events."""
    name = (
        op.get_bind()
        .exec_driver_sql(
            f"SELECT conname FROM pg_constraint WHERE conrelid = '{table}'::regclass "
            "AND contype = 'p'"
        )
        .scalar_one()
    )
    op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{name}" TO {table}_pkey')
