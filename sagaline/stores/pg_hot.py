"""PostgreSQL's hot statements straight on psycopg 3: a saga's insert, the claim, a
decision's read and write, and the saga read of `get()`.

SQLAlchemy keeps the schema, migrations, MySQL, SQLite and every other statement;
these run on connections of the same pool, as prepared statements. Each write is
one statement, its own transaction, in one round trip: several writes go in
data-modifying CTEs of one statement, not in psycopg's pipeline, whose exchange
costs ~100 µs of client CPU each time; statements with many parameters go on a
RawCursor, with PostgreSQL's own placeholders (see write_statement).

- a new saga: the saga, its steps and events (create_statement);
- a claim: the compare-and-set that feeds its event and, when it won, returns the
  saga's steps (the claimed one as claimed) and its row, one snapshot. Its
  transaction sets `synchronous_commit = off` (`set_config(..., true)`, evaluated
  for the claimed row, so that every claim that writes has it) and does not wait
  for its WAL flush: a claim lost in a database crash only lets the step's message
  be claimed again (at-least-once, which the design already allows), and the
  completion that follows commits synchronously, flushing the WAL that holds the
  claim before anything depends on it;
- the claim's completion, in the same process, decides on what its claim read
  (kept_claims.py) and writes its compare-and-sets and events (write_statement).
  No lock is held while it decides, so its write also checks the saga row's
  version, which every written decision moves on: of two branches deciding on
  reads made before either wrote, one loses and decides again under the lock;
- any other decision is two round trips: BEGIN, the saga row locked and read, its
  steps read (in a statement of their own after the lock, so that their snapshot
  is taken once the lock is held: see sql.py); then the write as above and COMMIT.

A decision or a saga too large for one statement (ONE_STATEMENT_PARAMS) is sent
as a pipeline of statements in one transaction instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Json
from sqlalchemy.engine import Engine

from ..records import Decision, Event, SagaRecord, SagaState
from ..states import SAGA_TERMINAL, Phase
from .base import Snapshot
from .finished import PG_MAX_PAYLOAD, pg_payload
from .hot_params import EVENT_COLUMNS, SAGA_JSON, STEP_JSON, HotParams
from .kept_claims import KeptClaims
from .pg_statements import (
    BUMP_SAGA,
    CLAIM,
    HOLD_SAGA,
    INSERT_EVENT,
    INSERT_SAGA,
    INSERT_STEP,
    LOCK_SAGA,
    NOTIFY,
    NOTIFY_ENDED,
    READ_SAGA,
    READ_STEPS,
    SAGA_COLUMNS,
    SAGA_COLUMNS_SET,
    SAGA_FLOATS,
    STEP_COLUMNS,
    STEP_COLUMNS_SET,
    UPDATE_SAGA,
    UPDATE_STEP,
    create_statement,
    write_statement,
)
from .row_memo import StepRowMemo, text_json_row
from .rows import from_row

PARAMS = HotParams(Json)

# A decision is written in one statement while its parameters stay below this (the
# protocol allows 65,535); a larger one (thousands of steps changed at once) is sent
# as a pipeline of statements instead, in the same transaction.
ONE_STATEMENT_PARAMS = 30_000


def ended_payload(written: dict[str, Any]) -> str | None:
    """The saga row as `write` stores it (the parameters of UPDATE_SAGA), as JSON; its
    JSON columns as the very text stored. None when it does not fit a payload."""
    row = {c: json.dumps(written[c].obj) if c in SAGA_JSON else written[c] for c in SAGA_COLUMNS}
    text = json.dumps(row)
    return text if len(text.encode()) <= PG_MAX_PAYLOAD else None


def decode_ended(payload: str) -> tuple[str, Callable[[], SagaRecord]]:
    """The saga id of an `ended_payload`, and how to decode its saga as `read_saga`
    would: JSON columns by json.loads (psycopg's loader), float8 columns as floats."""
    row = json.loads(payload)

    def record() -> SagaRecord:
        values = text_json_row(SAGA_COLUMNS, [row[c] for c in SAGA_COLUMNS], SAGA_JSON)
        return _saga_record(values)

    return row["saga_id"], record


def _saga_record(values: dict[str, Any]) -> SagaRecord:
    """A saga row decoded from JSON, its float8 columns as floats (an integral float8
    is a JSON integer), as psycopg reads them."""
    for c in SAGA_FLOATS:
        if values[c] is not None:
            values[c] = float(values[c])
    return from_row(SagaRecord, values)


class PgHotPath:
    """The hot statements on the SQLAlchemy engine's pooled psycopg connections."""

    # What a store retries of the errors raised here (see sql_dialects.transient), and
    # what a refused insert raises.
    retry_errors = (psycopg.OperationalError, psycopg.InterfaceError)
    integrity_error = psycopg.IntegrityError

    def __init__(self, engine: Engine):
        self.engine = engine
        self.steps = StepRowMemo()
        self.claims: KeptClaims[SagaState] = KeptClaims()

    def dispose_after_fork(self) -> None:
        self.claims.clear()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode while borrowed: BEGIN and COMMIT are
        sent as statements, inside the pipeline, not in round trips of their own.
        One that failed is dropped, not pooled again."""
        raw = self.engine.raw_connection()
        conn: Any = raw.driver_connection
        try:
            conn.autocommit = True
            yield conn
            if conn.info.transaction_status != TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
            conn.autocommit = False
        except BaseException as exc:
            if conn.broken or isinstance(exc, self.retry_errors):
                raw.invalidate(exc if isinstance(exc, Exception) else None)
            else:
                with contextlib.suppress(psycopg.Error):
                    if conn.info.transaction_status != TransactionStatus.IDLE:
                        conn.execute("ROLLBACK")
                    conn.autocommit = False
            raise
        finally:
            raw.close()  # back to the pool (dropped if invalidated)

    def listen_connection(self) -> Any:
        """A connection of the listener's own (finished.py), made like the pool's."""
        raw = self.engine.raw_connection()
        conn: Any = raw.driver_connection
        raw.detach()  # never returned to the pool
        conn.autocommit = True
        return conn

    def claim(self, phase: Phase, params: dict[str, Any]) -> bool:
        """The claim, and the saga as it is after it, kept for the claim's completion."""
        saga_id = params["k_saga_id"]
        with self.connection() as conn:
            rows = conn.execute(CLAIM[phase], params, prepare=True).fetchall()
        if not rows:
            return False
        saga = _saga_record(json.loads(next(r[-1] for r in rows if r[-1] is not None)))
        records = self.steps.records(saga_id, STEP_COLUMNS, [r[:-1] for r in rows])
        self.claims.keep(saga_id, SagaState(saga, {s.name: s for s in records}))
        return True

    def insert_saga(self, state: SagaState, events_: list[Event]) -> None:
        """The saga, its steps and events in one statement, or one pipelined transaction
        when there are too many for one (IntegrityError: refused)."""
        step_rows = [PARAMS.row(s, STEP_JSON) for s in state.steps.values()]
        event_rows = [PARAMS.event(e) for e in events_]
        saga_row = PARAMS.row(state.saga, SAGA_JSON)
        params: list[Any] = []
        for row in step_rows:
            params += [row[c] for c in STEP_COLUMNS]
        for row in event_rows:
            params += [row[c] for c in EVENT_COLUMNS]
        params += [saga_row[c] for c in SAGA_COLUMNS]
        with self.connection() as conn:
            if len(params) <= ONE_STATEMENT_PARAMS:
                statement = create_statement(len(step_rows), len(event_rows))
                with psycopg.RawCursor(conn) as cur:
                    cur.execute(statement, params, prepare=True)
                return
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(INSERT_SAGA, saga_row, prepare=True)
                with conn.cursor() as cur:
                    cur.executemany(INSERT_STEP, step_rows)
                    if event_rows:
                        cur.executemany(INSERT_EVENT, event_rows)
                conn.execute("COMMIT")

    def read_saga(self, saga_id: str) -> SagaRecord | None:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(READ_SAGA, (saga_id,), prepare=True).fetchone()
        return None if row is None else from_row(SagaRecord, row)

    @contextmanager
    def snapshot(self, saga_id: str) -> Iterator[Snapshot | None]:
        """The saga as this process's claim of one of its steps read it, without a lock;
        else locked (FOR UPDATE) and read with its steps in one round trip, the
        transaction open until the context exits (rolled back unless written)."""
        state = self.claims.take(saga_id)
        if state is not None:
            version = state.saga.version

            def write_unlocked(d: Decision) -> bool:
                with self.connection() as conn:
                    return self._write(conn, saga_id, d, version, begin=True)

            yield Snapshot(state, write_unlocked)
            return
        with self.connection() as conn:
            with conn.pipeline():
                conn.execute("BEGIN")
                saga_cur = conn.cursor(row_factory=dict_row)
                saga_cur.execute(LOCK_SAGA, (saga_id,), prepare=True)
                steps_cur = conn.cursor()
                steps_cur.execute(READ_STEPS, (saga_id,), prepare=True)
            row = saga_cur.fetchone()
            if row is None:
                yield None
                return
            saga = from_row(SagaRecord, row)
            records = self.steps.records(saga_id, STEP_COLUMNS, steps_cur.fetchall())
            yield Snapshot(
                SagaState(saga, {s.name: s for s in records}),
                lambda d: self._write(conn, saga_id, d, saga.version, begin=False),
            )

    def _write(
        self, conn: psycopg.Connection[Any], saga_id: str, d: Decision, version: int, *, begin: bool
    ) -> bool:
        """Write a decision made on the saga at `version` (compare-and-set on every record
        it changes) and commit it, in one round trip; False, rolled back, when one of
        them changed since it was read. `begin`: no transaction is open (the decision
        was made on a claim's read, without the lock); else the one holding the lock
        is committed.

        The saga row's version moves on with every decision that changes a record, so
        that a decision made without the lock loses to any decision written since its
        read. The write is one statement (`write_statement`): on its own it is its own
        transaction, and a compare-and-set that lost aborts it whole.
        """
        saga = d.saga
        written = None if saga is None else PARAMS.versioned(saga, SAGA_JSON, d.saga_version)
        params: list[Any] = []
        if written is not None:
            kind = "update"
            params += [written[c] for c in SAGA_COLUMNS_SET]
            params += (saga_id, d.saga_version)
        else:
            kind = "bump" if d.steps else "hold" if begin else ""
            if kind:
                params += (saga_id, version)
        for step in d.steps:
            row = PARAMS.versioned(step, STEP_JSON, d.expected_version(step))
            params += [row[c] for c in STEP_COLUMNS_SET]
            params += (saga_id, step.name, row["k_version"])
        for e in d.events:
            event = PARAMS.event(e)
            params += [event[c] for c in EVENT_COLUMNS]
        notify = 0
        if written is not None and saga is not None and saga.status in SAGA_TERMINAL:
            # Delivered at commit, in this order: wakes the callers waiting in get()
            # with the saga itself when it fits, else by its id (finished.py).
            ended = ended_payload(written)
            if ended is not None:
                params.append(ended)
            params.append(pg_payload(saga_id))
            notify = 1 if ended is None else 2
        if len(params) > ONE_STATEMENT_PARAMS:
            return self._write_pipelined(conn, saga_id, d, version, begin=begin)
        statement = write_statement(kind, len(d.steps), len(d.events), notify)
        try:
            with psycopg.RawCursor(conn) as cur:
                if begin:
                    cur.execute(statement, params, prepare=True)
                else:
                    with conn.pipeline():
                        cur.execute(statement, params, prepare=True)
                        conn.execute("COMMIT")
        except psycopg.errors.DivisionByZero:
            return False
        self.steps.written(saga_id, d)
        return True

    def _write_pipelined(
        self, conn: psycopg.Connection[Any], saga_id: str, d: Decision, version: int, *, begin: bool
    ) -> bool:
        """`_write` as a pipeline of statements, for a decision too large for one: each
        compare-and-set that matches no row divides by zero, which aborts the
        transaction, so that the COMMIT pipelined after it rolls everything back."""
        try:
            with conn.pipeline():
                if begin:
                    conn.execute("BEGIN")
                if d.saga is not None:
                    written = PARAMS.versioned(d.saga, SAGA_JSON, d.saga_version)
                    conn.execute(UPDATE_SAGA, written, prepare=True)
                elif d.steps:
                    conn.execute(
                        BUMP_SAGA, {"saga_id": saga_id, "k_version": version}, prepare=True
                    )
                elif begin:  # only events, decided without the lock
                    conn.execute(
                        HOLD_SAGA, {"saga_id": saga_id, "k_version": version}, prepare=True
                    )
                for s in d.steps:
                    conn.execute(
                        UPDATE_STEP,
                        PARAMS.versioned(s, STEP_JSON, d.expected_version(s)),
                        prepare=True,
                    )
                if d.events:
                    with conn.cursor() as cur:
                        cur.executemany(INSERT_EVENT, [PARAMS.event(e) for e in d.events])
                if d.saga is not None and d.saga.status in SAGA_TERMINAL:
                    # Delivered at commit, in this order: wakes the callers waiting in
                    # get() with the saga itself when it fits, else by its id (finished.py).
                    ended = ended_payload(written)
                    if ended is not None:
                        conn.execute(NOTIFY_ENDED, (ended,))
                    conn.execute(NOTIFY, (pg_payload(saga_id),))
                conn.execute("COMMIT")
        except psycopg.errors.DivisionByZero:
            return False
        self.steps.written(saga_id, d)
        return True
