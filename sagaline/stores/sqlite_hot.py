"""SQLite's hot statements straight on the standard library's driver: a saga's insert,
the claim, a decision's read and write, and the saga read of `get()`.

SQLAlchemy keeps the schema, migrations and every other statement; these run on
connections of the same pool, as plain SQL that the driver keeps prepared (its
statement cache). Through SQLAlchemy each statement cost ~0.1-0.2 ms of Python in
the worker (compiling the cache key, building the result, processing rows), which
is most of a step's time on a local file, and much of it was spent holding the
write lock. Values are stored as SQLAlchemy stores them: JSON columns as
`json.dumps` text (None as JSON null), booleans as 0/1.

Write transactions take the write lock up front (sql_dialects.begin_immediate),
as SQLAlchemy's begin event does for the store's other writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..records import PHASE_COLUMNS, Decision, Event, SagaRecord, SagaState
from ..states import Phase
from .base import Snapshot
from .hot_params import EVENT_COLUMNS, SAGA_JSON, STEP_JSON, HotParams
from .row_memo import StepRowMemo, text_json_row
from .rows import from_row
from .schema import events, sagas, steps
from .sqlite_lock import LOCK_WAIT_KEY, begin_immediate

PARAMS = HotParams(json.dumps)


def _insert(table: sa.Table, names: list[str]) -> str:
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"VALUES ({', '.join(':' + n for n in names)})"
    )


INSERT_SAGA = _insert(sagas, [c.name for c in sagas.c])
INSERT_STEP = _insert(steps, [c.name for c in steps.c])
INSERT_EVENT = _insert(events, EVENT_COLUMNS)
READ_SAGA = f"SELECT * FROM {sagas.name} WHERE saga_id = ?"
READ_STEPS = f"SELECT * FROM {steps.name} WHERE saga_id = ? ORDER BY position"
UPDATE_SAGA = (
    f"UPDATE {sagas.name} SET "
    + ", ".join(f"{c.name} = :{c.name}" for c in sagas.c if c.name != "saga_id")
    + " WHERE saga_id = :saga_id AND version = :k_version"
)
UPDATE_STEP = (
    f"UPDATE {steps.name} SET "
    + ", ".join(f"{c.name} = :{c.name}" for c in steps.c if c.name not in ("saga_id", "name"))
    + " WHERE saga_id = :saga_id AND name = :name AND version = :k_version"
)
# The claim's event, from the claim's parameters (detail: none, stored as JSON null).
CLAIM_EVENT = (
    f"INSERT INTO {events.name} (saga_id, ts, kind, step, attempt, phase, detail) "
    "VALUES (:k_saga_id, :k_now, :k_kind, :k_name, :k_attempt, :k_phase, 'null')"
)


def _claim(phase: Phase) -> str:
    """DISPATCHED(attempt) -> RUNNING on the phase's columns, as one compare-and-set."""
    cols = PHASE_COLUMNS[phase]
    started = ", started_at = :k_now" if phase is Phase.FORWARD else ""  # a compensation
    return (  # keeps the step's start time
        f"UPDATE {steps.name} SET {cols.status} = '{cols.running.value}'{started}, "
        "lease_until = :k_lease_until, due_at = :k_lease_until, owner_node = :k_owner_node, "
        "owner_boot = :k_owner_boot, owner_pid = :k_owner_pid, version = version + 1 "
        f"WHERE saga_id = :k_saga_id AND name = :k_name AND {cols.status} = "
        f"'{cols.dispatched.value}' AND {cols.attempt} = :k_attempt"
    )


CLAIM = {phase: _claim(phase) for phase in Phase}


def _record_rows(cur: sqlite3.Cursor, json_columns: frozenset[str]) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [text_json_row(names, r, json_columns) for r in cur.fetchall()]


class SqliteHotPath:
    """The hot statements on the SQLAlchemy engine's pooled sqlite3 connections."""

    # What a store retries of the errors raised here (see sql_dialects.transient), and
    # what a refused insert raises.
    retry_errors = (sqlite3.OperationalError,)
    integrity_error = sqlite3.IntegrityError

    def __init__(self, engine: Engine, path: Path | None):
        self.engine = engine
        self.path = path
        self.steps = StepRowMemo()

    @contextmanager
    def connection(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """A pooled connection (autocommit: sql_dialects.sqlite_setup), in a write
        transaction if `write`; whatever was not committed is rolled back at the end."""
        raw = self.engine.raw_connection()
        conn: Any = raw.driver_connection
        try:
            if write:
                begin_immediate(conn, raw.info.get(LOCK_WAIT_KEY, 30.0), self.path)
            yield conn
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except BaseException:
            with suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            raise
        finally:
            raw.close()  # back to the pool

    def claim(self, phase: Phase, params: dict[str, Any]) -> bool:
        with self.connection(write=True) as conn:
            if conn.execute(CLAIM[phase], params).rowcount != 1:
                return False
            conn.execute(CLAIM_EVENT, params)
            conn.execute("COMMIT")
            return True

    def insert_saga(self, state: SagaState, events_: list[Event]) -> None:
        """The saga, its steps and events in one transaction (IntegrityError: refused)."""
        with self.connection(write=True) as conn:
            conn.execute(INSERT_SAGA, PARAMS.row(state.saga, SAGA_JSON))
            conn.executemany(INSERT_STEP, [PARAMS.row(s, STEP_JSON) for s in state.steps.values()])
            if events_:
                conn.executemany(INSERT_EVENT, [PARAMS.event(e) for e in events_])
            conn.execute("COMMIT")

    def read_saga(self, saga_id: str) -> SagaRecord | None:
        with self.connection(write=False) as conn:
            rows = _record_rows(conn.execute(READ_SAGA, (saga_id,)), SAGA_JSON)
        return from_row(SagaRecord, rows[0]) if rows else None

    @contextmanager
    def snapshot(self, saga_id: str) -> Iterator[Snapshot | None]:
        """The saga and its steps read under the write lock, which is held until the
        context exits (rolled back unless written)."""
        with self.connection(write=True) as conn:
            sagas_ = _record_rows(conn.execute(READ_SAGA, (saga_id,)), SAGA_JSON)
            if not sagas_:
                yield None
                return
            cur = conn.execute(READ_STEPS, (saga_id,))
            names = [d[0] for d in cur.description]
            records = self.steps.records(saga_id, names, cur.fetchall())
            yield Snapshot(
                SagaState(from_row(SagaRecord, sagas_[0]), {s.name: s for s in records}),
                lambda d: self.write(conn, saga_id, d),
            )

    def dispose_after_fork(self) -> None:
        """Nothing to forget: the memo of step rows stays true in a child."""

    def write(self, conn: sqlite3.Connection, saga_id: str, d: Decision) -> bool:
        """Write a decision (compare-and-set on every record it changes) and commit it;
        False, left for the context to roll back, when one of them changed since it was read."""
        if d.saga is not None:
            row = PARAMS.versioned(d.saga, SAGA_JSON, d.saga_version)
            row["saga_id"] = saga_id
            if conn.execute(UPDATE_SAGA, row).rowcount != 1:
                return False
        if d.steps:
            rows = [PARAMS.versioned(s, STEP_JSON, d.expected_version(s)) for s in d.steps]
            for row in rows:
                row["saga_id"] = saga_id
            if conn.executemany(UPDATE_STEP, rows).rowcount != len(rows):
                return False
        if d.events:
            conn.executemany(INSERT_EVENT, [PARAMS.event(e) for e in d.events])
        conn.execute("COMMIT")
        self.steps.written(saga_id, d)
        return True
