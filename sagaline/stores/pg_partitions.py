"""PostgreSQL's event history in monthly partitions: creating months ahead, listing them,
and dropping the months that only hold the events of deleted sagas.

`sagaline_events` is partitioned by range of `ts` (epoch seconds, UTC) since migration
0009, one partition per calendar month (`sagaline_events_pYYYYMM`) and a DEFAULT
partition (`sagaline_events_default`) as a safety net: an event whose month has no
partition yet lands there instead of failing its transaction. Months are created
ahead (AHEAD_MONTHS) by the migration, by every store process once at start, by the
sweeper's pass once an hour and before every drop; creating a month moves the rows
the DEFAULT partition holds for it, so that partition normally stays empty.

Every function runs in the caller's transaction, on a SQLAlchemy connection, and
sets a short `lock_timeout` for it: DDL on a partition waits for the transactions
using it and, while waiting, holds up the inserts behind it; better to fail and try
again at the next pass than to stall the hot path. Commit soon after.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from ..states import SAGA_TERMINAL, SagaStatus

log = logging.getLogger(__name__)

EVENTS = "sagaline_events"
DEFAULT_PARTITION = f"{EVENTS}_default"
AHEAD_MONTHS = 3  # months created after the current one
# A saga's events are never older than the saga, up to the clock skew between the
# hosts that write them: a month is dropped only when no saga left was created before
# its end plus this margin.
SKEW_MARGIN = 3600.0
LOCK_TIMEOUT = "5s"
# The same advisory lock as the migration: one process at a time changes partitions.
ADVISORY_LOCK = 7366551
_MONTH_NAME = re.compile(rf"^{EVENTS}_p(\d{{4}})(\d{{2}})$")
_BOUND = re.compile(r"FROM \('?([-0-9.e+]+)'?\) TO \('?([-0-9.e+]+)'?\)")


@dataclass(frozen=True)
class Partition:
    """One partition of the events table; `lower`/`upper` are None for DEFAULT."""

    name: str
    lower: float | None
    upper: float | None

    @property
    def is_default(self) -> bool:
        return self.lower is None


# -- months ---------------------------------------------------------------------------


def month_start(ts: float) -> datetime:
    """The first instant (UTC) of the month holding `ts`."""
    d = datetime.fromtimestamp(ts, tz=timezone.utc)
    return datetime(d.year, d.month, 1, tzinfo=timezone.utc)


def add_months(month: datetime, n: int) -> datetime:
    index = month.year * 12 + month.month - 1 + n
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=timezone.utc)


def partition_name(month: datetime) -> str:
    return f"{EVENTS}_p{month.year:04d}{month.month:02d}"


def is_layout_object(name: str | None, kind: str) -> bool:
    """Whether `name` is a partition of the events table, or the index of the
    unpartitioned table that the partitioned one's primary key replaces: what
    PostgreSQL's schema holds beyond (or instead of) schema.py's metadata."""
    if kind == "table":
        return name == DEFAULT_PARTITION or bool(name and _MONTH_NAME.match(name))
    return kind == "index" and name == "ix_sagaline_events_saga"


# -- reading ----------------------------------------------------------------------------


def is_partitioned(conn: Connection) -> bool:
    """Whether the events table is partitioned (PostgreSQL at revision 0009 or later)."""
    if conn.dialect.name != "postgresql":
        return False
    row = conn.execute(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": EVENTS}
    ).first()
    return row is not None and row[0] == "p"


def list_partitions(conn: Connection) -> list[Partition]:
    """The partitions of the events table, months oldest first, then DEFAULT."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": EVENTS},
    ).all()
    parts = []
    for name, bound in rows:
        if bound == "DEFAULT":
            parts.append(Partition(name, None, None))
            continue
        m = _BOUND.search(bound)
        if m is None:
            raise ValueError(f"partition {name} has a bound sagaline does not know: {bound}")
        parts.append(Partition(name, float(m.group(1)), float(m.group(2))))
    parts.sort(key=lambda p: (p.is_default, p.lower or 0.0))
    return parts


def _lock(conn: Connection) -> None:
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})


# -- creating ---------------------------------------------------------------------------


def create_month(conn: Connection, month: datetime) -> Partition:
    """Create the partition of `month`, moving in the rows the DEFAULT partition holds for it.

    Built apart and attached (ATTACH takes a SHARE UPDATE EXCLUSIVE lock on the events
    table, which inserts do not wait for; CREATE TABLE ... PARTITION OF would take an
    ACCESS EXCLUSIVE one). Indexes and the primary key follow from the parent at ATTACH.
    """
    lower, upper = month.timestamp(), add_months(month, 1).timestamp()
    name = partition_name(month)
    conn.execute(sa.text(f"CREATE TABLE {name} (LIKE {EVENTS} INCLUDING DEFAULTS)"))
    has_default = conn.execute(
        sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": DEFAULT_PARTITION}
    ).scalar()
    if has_default:
        # ATTACH checks that DEFAULT holds no row of the new range: move them first,
        # under the lock that keeps new ones out until the commit.
        conn.execute(sa.text(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE"))
        conn.execute(
            sa.text(
                f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= :lo AND ts < :hi "
                f"RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            ),
            {"lo": lower, "hi": upper},
        )
    # A CHECK matching the bound spares ATTACH its scan of the rows just moved.
    conn.execute(
        sa.text(
            f"ALTER TABLE {name} ADD CONSTRAINT {name}_range "
            f"CHECK (ts >= {lower!r} AND ts < {upper!r})"
        )
    )
    conn.execute(
        sa.text(
            f"ALTER TABLE {EVENTS} ATTACH PARTITION {name} "
            f"FOR VALUES FROM ({lower!r}) TO ({upper!r})"
        )
    )
    conn.execute(sa.text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range"))
    return Partition(name, lower, upper)


def ensure_partitions(
    conn: Connection, now: float, *, ahead: int = AHEAD_MONTHS, max_default_months: int = 240
) -> list[Partition]:
    """Create the partitions of the current month, the `ahead` next ones, and of every
    month the DEFAULT partition holds rows of (at most `max_default_months` of them);
    returns the partitions created. A no-op where the events table is not partitioned."""
    if not is_partitioned(conn):
        return []
    existing = {p.name for p in list_partitions(conn)}
    first = month_start(now)
    wanted = [add_months(first, k) for k in range(ahead + 1)]
    if DEFAULT_PARTITION in existing:
        held = conn.execute(
            sa.text(
                "SELECT DISTINCT date_trunc('month', to_timestamp(ts) AT TIME ZONE 'UTC') "
                f"FROM {DEFAULT_PARTITION} LIMIT :n"
            ),
            {"n": max_default_months},
        ).scalars()
        wanted += [m.replace(tzinfo=timezone.utc) for m in held]
    missing = sorted({m for m in wanted if partition_name(m) not in existing})
    if not missing:
        return []
    _lock(conn)
    existing = {p.name for p in list_partitions(conn)}  # another process may have made them
    return [create_month(conn, m) for m in missing if partition_name(m) not in existing]


CHECK_EVERY = 3600.0  # seconds between a store process's checks of the months ahead


class MonthsAhead:
    """A store process's checks of the months ahead: at migrate (every process start)
    and then hourly from the sweeper's pass (SQLStore.find_due)."""

    def __init__(self, writer: Engine) -> None:
        self.writer = writer
        self.checked: float | None = None  # time.monotonic() of the last check

    def check(self, now: float | None = None) -> None:
        """Best effort: the DEFAULT partition takes the events of a month not created
        yet, so a failure (a lock not granted in time) is logged and tried again at
        the next hourly check."""
        self.checked = time.monotonic()
        try:
            with self.writer.begin() as conn:
                ensure_partitions(conn, time.time() if now is None else now)
        except sa_exc.DBAPIError as exc:
            log.warning("could not create the event partitions ahead: %s", exc)

    def check_hourly(self) -> None:
        if self.checked is None or time.monotonic() - self.checked > CHECK_EVERY:
            self.check()


# -- dropping ---------------------------------------------------------------------------


def droppable(conn: Connection, part: Partition, cutoff: float, margin: float) -> bool:
    """Whether month `part` holds only events older than `cutoff` of sagas that are gone."""
    if part.upper is None or part.upper > cutoff:
        return False
    kept = conn.execute(
        sa.text("SELECT 1 FROM sagaline_sagas WHERE created_at < :t LIMIT 1"),
        {"t": part.upper + margin},
    ).first()
    return kept is None


def drop_expired_partitions(
    conn: Connection, cutoff: float, *, margin: float = SKEW_MARGIN
) -> list[Partition]:
    """Drop the month partitions whose events are all older than `cutoff` and belong to
    no saga left in the store; returns those dropped (oldest first).

    Safe whatever deleted the sagas: a month is dropped only when no remaining saga was
    created before the month's end (plus `margin` for clock skew), and a saga's events
    are never older than the saga. The gc calls it after its batches deleted the
    finished sagas: their events in these months go with the DROP. Months that a kept
    saga still has events in stay, whole. The DEFAULT partition is never dropped.
    A no-op (empty list) where the events table is not partitioned.
    """
    if not is_partitioned(conn):
        return []
    _lock(conn)
    dropped = []
    for part in list_partitions(conn):
        if part.is_default or not droppable(conn, part, cutoff, margin):
            # Months are in order: once one must stay, the newer ones must too.
            if not part.is_default:
                break
            continue
        # Locked before the check is repeated: no transaction adds to it meanwhile.
        conn.execute(sa.text(f"LOCK TABLE {part.name} IN ACCESS EXCLUSIVE MODE"))
        if not droppable(conn, part, cutoff, margin):
            break
        conn.execute(sa.text(f"DROP TABLE {part.name}"))
        dropped.append(part)
    return dropped


def row_delete_floor(
    conn: Connection,
    cutoff: float,
    *,
    statuses: frozenset[SagaStatus] = SAGA_TERMINAL,
    name: str | None = None,
    margin: float = SKEW_MARGIN,
) -> float | None:
    """The gc's events below this `ts` need no row deletes: they lie in months that
    `drop_expired_partitions(conn, cutoff)` will drop once the gc deleted the finished
    sagas (of `statuses`, and named `name` if given) finished before `cutoff`. None:
    every event needs its row delete.

    It is the end of the newest month before `cutoff` that no kept saga (one not in
    `statuses`, of another name, finished at or after `cutoff`, or not finished; a
    child kept for its running parent was created after that parent) has events in, and
    never above a row the DEFAULT partition holds. Should the gc keep a saga anyway
    (a resume raced it), that month stays and so do the other events in it, until a
    later gc drops it: a saga's events are never lost, other events may outlive their
    saga for a while.
    """
    if not is_partitioned(conn):
        return None
    months = [p for p in list_partitions(conn) if p.upper is not None and p.upper <= cutoff]
    if not months:
        return None
    kept = "status <> ALL(:statuses) OR finished_at IS NULL OR finished_at >= :cutoff"
    if name is not None:
        kept += " OR name <> :name"
    oldest_kept = conn.execute(
        sa.text(
            f"SELECT min(created_at) FROM sagaline_sagas WHERE created_at < :horizon AND ({kept})"
        ),
        {
            "cutoff": cutoff,
            "horizon": cutoff + margin,
            "statuses": sorted(s.value for s in statuses),
            "name": name,
        },
    ).scalar()
    floor = None
    for part in months:
        assert part.upper is not None
        if oldest_kept is not None and part.upper + margin > oldest_kept:
            break
        floor = part.upper
    if floor is not None and any(p.is_default for p in list_partitions(conn)):
        lowest = conn.execute(sa.text(f"SELECT min(ts) FROM {DEFAULT_PARTITION}")).scalar()
        if lowest is not None and lowest < floor:
            return None
    return floor
