"""The SQL store's statements, built once (SQLAlchemy caches their compiled form), and
the conversions between its rows and records (through rows.py, by field name)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..records import PHASE_COLUMNS, Decision, Event, SagaFilter, SagaRecord, StepRecord
from ..states import Phase
from .rows import from_row, to_row
from .schema import events, sagas, steps

# The saga and its steps in one query, each table's columns under its own prefix.
SAGA_LABELS = {c.name: f"g_{c.name}" for c in sagas.c}
STEP_LABELS = {c.name: f"s_{c.name}" for c in steps.c}
STATE = (
    sa.select(
        *[c.label(SAGA_LABELS[c.name]) for c in sagas.c],
        *[c.label(STEP_LABELS[c.name]) for c in steps.c],
    )
    .select_from(sagas.join(steps, steps.c.saga_id == sagas.c.saga_id))
    .where(sagas.c.saga_id == sa.bindparam("k_saga_id"))
    .order_by(steps.c.position)
)
# The saga row lock that serializes transact (not taken on SQLite: see SQLStore._locked).
LOCK_SAGA = (
    sa.select(sagas.c.saga_id).where(sagas.c.saga_id == sa.bindparam("k_saga_id")).with_for_update()
)

_UPDATE_SAGA = (
    sagas.update()
    .where(
        sagas.c.saga_id == sa.bindparam("k_saga_id"), sagas.c.version == sa.bindparam("k_version")
    )
    .values({c.name: sa.bindparam(f"v_{c.name}") for c in sagas.c if c.name != "saga_id"})
)
# The lock is held: no compare-and-set needed.
_BUMP_SAGA = (
    sagas.update()
    .where(sagas.c.saga_id == sa.bindparam("k_saga_id"))
    .values(version=sagas.c.version + 1)
)
_UPDATE_STEP = (
    steps.update()
    .where(
        steps.c.saga_id == sa.bindparam("k_saga_id"),
        steps.c.name == sa.bindparam("k_name"),
        steps.c.version == sa.bindparam("k_version"),
    )
    .values(
        {c.name: sa.bindparam(f"v_{c.name}") for c in steps.c if c.name not in ("saga_id", "name")}
    )
)

_CLAIM_OWNER: dict[str, Any] = {
    "owner_node": sa.bindparam("k_owner_node"),
    "owner_boot": sa.bindparam("k_owner_boot"),
    "owner_pid": sa.bindparam("k_owner_pid"),
}


def _claim(phase: Phase) -> sa.Update:
    """DISPATCHED(attempt) -> RUNNING on the phase's columns, as one compare-and-set."""
    cols = PHASE_COLUMNS[phase]
    values: dict[str, Any] = {cols.status: cols.running.value}
    if phase is Phase.FORWARD:  # a compensation keeps the step's start time
        values["started_at"] = sa.bindparam("k_now")
    return (
        steps.update()
        .where(
            steps.c.saga_id == sa.bindparam("k_saga_id"),
            steps.c.name == sa.bindparam("k_name"),
            steps.c[cols.status] == cols.dispatched.value,
            steps.c[cols.attempt] == sa.bindparam("k_attempt"),
        )
        .values(
            **values,
            lease_until=sa.bindparam("k_lease_until"),
            due_at=sa.bindparam("k_lease_until"),
            **_CLAIM_OWNER,
            version=steps.c.version + 1,
        )
    )


CLAIM = {phase: _claim(phase) for phase in Phase}


def renew_statement(
    saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
) -> sa.Update:
    """A RUNNING claim's lease extended, as a compare-and-set on its attempt."""
    cols = PHASE_COLUMNS[phase]
    return (
        steps.update()
        .where(
            steps.c.saga_id == saga_id,
            steps.c.name == step,
            steps.c[cols.status] == cols.running.value,
            steps.c[cols.attempt] == attempt,
        )
        .values(lease_until=lease_until, due_at=lease_until, version=steps.c.version + 1)
    )


def write_decision(conn: Connection, saga_id: str, d: Decision) -> bool:
    """Write a decision with compare-and-set on every record it changes, in the
    transaction that holds the saga's lock (or SQLite's write lock).

    The saga's version moves on even when only steps change: PostgreSQL decides a
    completion on what its claim read, without the lock, and its write checks that
    version (pg_hot.py), so it loses to this decision and decides again.
    """
    if d.saga is not None:
        row = {f"v_{k}": v for k, v in to_row(d.saga).items() if k != "saga_id"}
        row.update(k_saga_id=saga_id, k_version=d.saga_version, v_version=d.saga_version + 1)
        if conn.execute(_UPDATE_SAGA, row).rowcount != 1:
            return False
    elif d.steps:
        conn.execute(_BUMP_SAGA, {"k_saga_id": saga_id})
    if d.steps:
        rows = []
        for s in d.steps:
            expected = d.expected_version(s)
            row = {f"v_{k}": v for k, v in to_row(s).items() if k not in ("saga_id", "name")}
            row.update(k_saga_id=saga_id, k_name=s.name, k_version=expected, v_version=expected + 1)
            rows.append(row)
        # One executemany: psycopg pipelines it into a single round trip.
        if conn.execute(_UPDATE_STEP, rows).rowcount != len(rows):
            return False
    if d.events:
        conn.execute(events.insert(), [event_row(e) for e in d.events])
    return True


def event_row(e: Event) -> dict[str, Any]:
    # seq is the table's own counter; an empty detail is stored as NULL.
    row = to_row(e)
    del row["seq"]
    row["detail"] = e.detail or None
    return row


def saga_record(row: Any, labels: dict[str, str] | None = None) -> SagaRecord:
    return from_row(SagaRecord, _columns(row, labels))


def step_record(row: Any, labels: dict[str, str] | None = None) -> StepRecord:
    return from_row(StepRecord, _columns(row, labels))


def event_record(row: Any) -> Event:
    event = from_row(Event, row._mapping)
    event.detail = event.detail or {}
    return event


def _columns(row: Any, labels: dict[str, str] | None) -> Mapping[str, Any]:
    """One table's columns by name, out of a plain row or (by `labels`) a joined one."""
    m = row._mapping
    return m if labels is None else {name: m[label] for name, label in labels.items()}


# -- the read queries of listing, counting, the sweeper and the hand-back ------------


def list_query(flt: SagaFilter) -> sa.Select[Any]:
    """Sagas matching `flt`, newest first (keyset on (created_at, saga_id) by `before`)."""
    q = sa.select(sagas)
    if flt.status is not None:
        q = q.where(sagas.c.status.in_([s.value for s in flt.status]))
    if flt.name:
        q = q.where(sagas.c.name == flt.name)
    if flt.created_after is not None:
        q = q.where(sagas.c.created_at >= flt.created_after)
    if flt.created_before is not None:
        q = q.where(sagas.c.created_at < flt.created_before)
    if flt.parent_saga_id is not None:
        q = q.where(sagas.c.parent_saga_id == flt.parent_saga_id)
    if flt.idempotency_key is not None:
        q = q.where(sagas.c.idempotency_key == flt.idempotency_key)
    if flt.failed_step is not None:
        q = q.where(sagas.c.failed_step == flt.failed_step)
    if flt.before is not None:
        at, sid = flt.before
        # The first condition alone can use the created_at indexes; the second cuts ties.
        q = q.where(
            sagas.c.created_at <= at, sa.or_(sagas.c.created_at < at, sagas.c.saga_id < sid)
        )
    q = q.order_by(sagas.c.created_at.desc(), sagas.c.saga_id.desc())
    q = q.limit(flt.limit).offset(flt.offset)
    return q


def count_query(name: str | None) -> sa.Select[Any]:
    """How many sagas (of `name`, if given) are in each status."""
    q = sa.select(sagas.c.status, sa.func.count()).group_by(sagas.c.status)
    if name:
        q = q.where(sagas.c.name == name)
    return q


def due_queries(now: float, limit: int) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """The sagas and the steps whose due time has come, earliest first."""
    q_sagas = (
        sa.select(sagas.c.saga_id, sagas.c.due_at)
        .where(sagas.c.due_at <= now)
        .order_by(sagas.c.due_at)
        .limit(limit)
    )
    q_steps = (
        sa.select(steps.c.saga_id, steps.c.name, steps.c.due_at)
        .where(steps.c.due_at <= now)
        .order_by(steps.c.due_at)
        .limit(limit)
    )
    return q_sagas, q_steps


def claimed_query(node: str, limit: int) -> sa.Select[Any]:
    """The steps that worker `node` holds a claim on."""
    # due_at is set while a claim runs: the (owner_node, due_at) index skips the
    # node's finished steps.
    q = (
        sa.select(steps)
        .where(
            steps.c.owner_node == node,
            steps.c.due_at.is_not(None),
            sa.or_(*(steps.c[c.status] == c.running.value for c in PHASE_COLUMNS.values())),
        )
        .order_by(steps.c.due_at)
        .limit(limit)
    )
    return q
