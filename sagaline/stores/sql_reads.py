"""The SQL store's reads, each on one connection (SQLStore runs them with its retries);
the statements they run are built in sql_statements.py."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..records import Event, SagaRecord, StepRecord
from ..states import SagaStatus
from .base import DueItem
from .schema import events, sagas, steps
from .sql_statements import event_record, saga_record, step_record


def read_saga(conn: Connection, saga_id: str) -> SagaRecord | None:
    row = conn.execute(sa.select(sagas).where(sagas.c.saga_id == saga_id)).first()
    return None if row is None else saga_record(row)


def read_steps(conn: Connection, saga_id: str) -> list[StepRecord]:
    rows = conn.execute(
        sa.select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.position)
    )
    return [step_record(r) for r in rows]


def read_steps_of(conn: Connection, saga_ids: list[str]) -> dict[str, list[StepRecord]]:
    found: dict[str, list[StepRecord]] = {}
    rows = conn.execute(
        sa.select(steps)
        .where(steps.c.saga_id.in_(saga_ids))
        .order_by(steps.c.saga_id, steps.c.position)
    )
    for r in rows:
        rec = step_record(r)
        found.setdefault(rec.saga_id, []).append(rec)
    return found


def read_history(conn: Connection, saga_id: str, after_seq: int, limit: int | None) -> list[Event]:
    q = (
        sa.select(events)
        .where(events.c.saga_id == saga_id, events.c.seq > after_seq)
        .order_by(events.c.seq)
    )
    return [event_record(r) for r in conn.execute(q if limit is None else q.limit(limit))]


def read_history_tail(
    conn: Connection, saga_id: str, limit: int, before_seq: int | None
) -> list[Event]:
    q = sa.select(events).where(events.c.saga_id == saga_id)
    if before_seq is not None:
        q = q.where(events.c.seq < before_seq)
    rows = conn.execute(q.order_by(events.c.seq.desc()).limit(limit))
    return [event_record(r) for r in rows][::-1]


def read_counts(conn: Connection, q: sa.Select[Any]) -> dict[SagaStatus, int]:
    """The sagas per status, by `count_query`; a status without sagas counts 0."""
    counts = dict.fromkeys(SagaStatus, 0)
    for status, n in conn.execute(q):
        counts[SagaStatus(status)] = int(n)
    return counts


def read_due(
    conn: Connection, q_sagas: sa.Select[Any], q_steps: sa.Select[Any], limit: int
) -> list[DueItem]:
    """The first `limit` due sagas and steps, by `due_queries`, soonest first."""
    items = [DueItem(r.saga_id, None, r.due_at) for r in conn.execute(q_sagas)]
    items += [DueItem(r.saga_id, r.name, r.due_at) for r in conn.execute(q_steps)]
    items.sort(key=lambda d: d.due_at)
    return items[:limit]
