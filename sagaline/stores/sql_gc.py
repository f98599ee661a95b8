"""Retention on the SQL store (retention.py): the statements of `Store.gc`'s steps.

A batch is deleted in one short write transaction, by lists of saga ids, through
the primary keys and the (saga_id, seq) index of the events: first the saga rows
are locked (PostgreSQL and MySQL skip the rows another transaction holds, so gc
never waits on a saga nor on another sweeper's gc; SQLite's write transaction
holds the database), then re-checked, then their events, steps and rows deleted.
On MySQL that transaction is READ COMMITTED: REPEATABLE READ would lock the gaps after
the ids it looks up, the next batch's rows among them, for other runs to skip.
A `transact` of a deleted saga that waited for the lock finds no saga, as for an
unknown id. The outbox and inbox tables are not keyed by saga and are left alone.

On PostgreSQL the events table is partitioned by month (pg_partitions.py): events
older than `row_delete_floor` are not deleted row by row; once a run has looked at
every candidate, the months that no kept saga has events in are dropped whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..states import SagaStatus
from . import pg_partitions
from .retention import GcRemoved, GcRule, GcTree, removed_of
from .schema import events, sagas, steps

# Ids per IN list: within every database's limit on bound parameters.
CHUNK = 500

_parent = sagas.alias("parent")


def candidates(
    conn: Connection, rule: GcRule, name: str | None, limit: int, after: str | None
) -> tuple[list[tuple[str, SagaStatus]], str | None]:
    ended = sa.func.coalesce(sagas.c.finished_at, sagas.c.updated_at)
    q = (
        sa.select(sagas.c.saga_id, sagas.c.status)
        .where(
            sagas.c.status.in_(sorted(s.value for s in rule.statuses)),
            # finished_at first, so that the (status, finished_at) index serves; the
            # coalesce only decides for sagas stored before finished_at existed.
            sa.or_(sagas.c.finished_at < rule.cutoff, sagas.c.finished_at.is_(None)),
            ended < rule.cutoff,
            sa.or_(
                sagas.c.parent_saga_id.is_(None),
                ~sa.exists().where(_parent.c.saga_id == sagas.c.parent_saga_id),
            ),
        )
        .order_by(sagas.c.saga_id)
        .limit(limit + 1)
    )
    if name is not None:
        q = q.where(sagas.c.name == name)
    if after is not None:
        q = q.where(sagas.c.saga_id > after)
    rows = [(str(r.saga_id), SagaStatus(r.status)) for r in conn.execute(q)]
    page = rows[:limit]
    return page, (page[-1][0] if len(rows) > limit else None)


def children(conn: Connection, ids: list[str]) -> list[tuple[str, str, SagaStatus]]:
    found = []
    for part in _chunks(ids):
        q = sa.select(sagas.c.parent_saga_id, sagas.c.saga_id, sagas.c.status).where(
            sagas.c.parent_saga_id.in_(part)
        )
        found += [(str(r[0]), str(r[1]), SagaStatus(r[2])) for r in conn.execute(q)]
    return found


def count(conn: Connection, trees: list[GcTree]) -> GcRemoved:
    ids = [sid for t in trees for sid in t.sagas]
    n_steps = n_events = 0
    for part in _chunks(ids):
        n_steps += _scalar(conn, sa.select(sa.func.count()).where(steps.c.saga_id.in_(part)))
        n_events += _scalar(conn, sa.select(sa.func.count()).where(events.c.saga_id.in_(part)))
    return removed_of(trees, n_steps, n_events)


def writer(engine: Engine, dialect: str) -> Engine:
    """The engine of a batch's delete transaction: READ COMMITTED on MySQL, whose
    REPEATABLE READ would lock the next batch's rows for other runs to skip."""
    if dialect != "mysql":
        return engine
    return engine.execution_options(isolation_level="READ COMMITTED")


def delete(conn: Connection, trees: list[GcTree], rule: GcRule, dialect: str) -> GcRemoved:
    """Delete the trees that are still as read, in the caller's write transaction."""
    ids = [sid for t in trees for sid in t.sagas]
    held: dict[str, Any] = {}
    for part in _chunks(ids):
        q = sa.select(
            sagas.c.saga_id, sagas.c.status, sagas.c.finished_at, sagas.c.updated_at
        ).where(sagas.c.saga_id.in_(part))
        if dialect != "sqlite":
            q = q.with_for_update(skip_locked=True)
        held.update({r.saga_id: r for r in conn.execute(q)})
    below = children(conn, ids)
    gone = [t for t in trees if _still(t, rule, held, below)]
    removed = removed_of(gone, 0, 0)
    for part in _chunks([sid for t in gone for sid in t.sagas]):
        doomed = events.delete().where(events.c.saga_id.in_(part))
        if rule.row_floor is not None:
            doomed = doomed.where(events.c.ts >= rule.row_floor)
        removed.events += conn.execute(doomed).rowcount
        removed.steps += conn.execute(steps.delete().where(steps.c.saga_id.in_(part))).rowcount
        conn.execute(sagas.delete().where(sagas.c.saga_id.in_(part)))
    return removed


def prepare(conn: Connection, rule: GcRule, dialect: str) -> GcRule:
    """`rule` with its `row_floor`: on PostgreSQL, the events in months that
    drop_partitions will drop whole need no row deletes (pg_partitions.row_delete_floor
    says below which time). Once per run: the sagas it keeps do not change with what
    the batches delete."""
    if dialect != "postgresql":
        return rule
    floor = pg_partitions.row_delete_floor(
        conn, rule.cutoff, statuses=rule.statuses, name=rule.name
    )
    return replace(rule, row_floor=floor)


def drop_partitions(conn: Connection, rule: GcRule, dialect: str) -> list[str]:
    """The month partitions of the events table that the run emptied of kept sagas,
    dropped (PostgreSQL; nothing elsewhere)."""
    if dialect != "postgresql":
        return []
    return [p.name for p in pg_partitions.drop_expired_partitions(conn, rule.cutoff)]


def _still(
    tree: GcTree, rule: GcRule, held: dict[str, Any], below: list[tuple[str, str, SagaStatus]]
) -> bool:
    """Whether every saga of the tree is locked here in the status read, no child was
    added, and `rule` still accepts the root."""
    root = held.get(tree.root)
    if root is None or not rule.qualifies(
        SagaStatus(root.status), root.finished_at, root.updated_at
    ):
        return False
    if any(sid not in held or held[sid].status != status for sid, status in tree.sagas.items()):
        return False
    return all(child in tree.sagas for parent, child, _ in below if parent in tree.sagas)


def _scalar(conn: Connection, q: Any) -> int:
    return int(conn.execute(q).scalar_one())


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]
