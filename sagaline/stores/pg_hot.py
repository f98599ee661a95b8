"""PostgreSQL's hot statements straight on psycopg 3: a saga's insert, the claim, a
decision's read and write, and the saga read of `get()`.

SQLAlchemy keeps the schema, migrations, MySQL, SQLite and every other statement;
these run on connections of the same pool, as prepared statements, in psycopg's
pipeline mode, where statements are sent together and answered together:

- a new saga is one round trip: BEGIN, the saga, its steps and events, COMMIT;

- a claim is one round trip and one statement, its own transaction: the
  compare-and-set that feeds its event, which also sets `synchronous_commit = off`
  for that transaction (`set_config(..., true)`, evaluated for the claimed row, so
  that every claim that writes has it). The claim does not wait for its WAL
  flush: a claim lost in a database crash only lets the step's message be
  claimed again (at-least-once, which the design already allows), and the
  completion that follows commits synchronously, flushing the WAL that holds the
  claim before anything depends on it;
- a decision is two: BEGIN, the saga row locked and read, its steps read (in a
  statement of their own after the lock, so that their snapshot is taken once the
  lock is held: see sql.py); then the compare-and-set writes, the events and
  COMMIT, which a compare-and-set that lost turns into a rollback.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Json
from sqlalchemy.engine import Engine

from ..records import PHASE_COLUMNS, Decision, Event, SagaRecord, SagaState, StepRecord
from ..states import SAGA_TERMINAL, Phase
from .finished import PG_CHANNEL, pg_payload
from .rows import from_row, to_row
from .schema import events, sagas, steps

# A claim in one statement: the compare-and-set feeds the insert of its event.
_CLAIM = """
WITH claimed AS (
    UPDATE sagaline_steps SET {set_status}, lease_until = %(k_lease_until)s,
           due_at = %(k_lease_until)s, owner_node = %(k_owner_node)s,
           owner_boot = %(k_owner_boot)s, owner_pid = %(k_owner_pid)s, version = version + 1
    WHERE saga_id = %(k_saga_id)s AND name = %(k_name)s AND {status_col} = '{dispatched}'
          AND {attempt_col} = %(k_attempt)s
    RETURNING saga_id)
INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase)
SELECT saga_id, %(k_now)s, %(k_kind)s, %(k_name)s, %(k_attempt)s, %(k_phase)s FROM claimed
WHERE set_config('synchronous_commit', 'off', true) = 'off'"""


def _claim(phase: Phase) -> str:
    cols = PHASE_COLUMNS[phase]
    set_status = f"{cols.status} = '{cols.running.value}'"
    if phase is Phase.FORWARD:  # a compensation keeps the step's start time
        set_status += ", started_at = %(k_now)s"
    return _CLAIM.format(
        set_status=set_status,
        status_col=cols.status,
        dispatched=cols.dispatched.value,
        attempt_col=cols.attempt,
    )


CLAIM = {phase: _claim(phase) for phase in Phase}
READ_SAGA = f"SELECT * FROM {sagas.name} WHERE saga_id = %s"
LOCK_SAGA = READ_SAGA + " FOR UPDATE"
READ_STEPS = f"SELECT * FROM {steps.name} WHERE saga_id = %s ORDER BY position"


def _cast(column: sa.Column[Any]) -> str:
    """The SQL type a value for `column` is read as (text for strings, so that the
    column's own length check applies on assignment, never a cast's truncation)."""
    kind = column.type
    if isinstance(kind, sa.JSON):
        return "json"
    if isinstance(kind, sa.Boolean):
        return "boolean"
    if isinstance(kind, sa.Float):
        return "double precision"
    if isinstance(kind, sa.BigInteger):
        return "bigint"
    if isinstance(kind, sa.Integer):
        return "integer"
    return "text"


def _is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.JSON)


def _quoted(columns: list[sa.Column[Any]]) -> str:
    return ", ".join(f'"{c.name}"' for c in columns)


def _rows(columns: list[sa.Column[Any]], extra: str = "") -> str:
    """Rows passed as one JSON array of objects (one parameter, whatever their number).
    A JSON column's value travels as its JSON text, so that None stays JSON null (as
    SQLAlchemy's JSON type writes it) instead of becoming SQL NULL."""
    defs = ", ".join(f'"{c.name}" {"text" if _is_json(c) else _cast(c)}' for c in columns)
    return f"json_to_recordset(%s::json) AS v({defs}{extra})"


def _value(column: sa.Column[Any]) -> str:
    return f'v."{column.name}"::json' if _is_json(column) else f'v."{column.name}"'


_SAGA_SET = [c for c in sagas.c if c.name != "saga_id"]
_STEP_SET = [c for c in steps.c if c.name not in ("saga_id", "name")]
_STEP_KEYED = [steps.c.saga_id, steps.c.name, *_STEP_SET]
_EVENT_COLUMNS = [c for c in events.c if c.name != "seq"]


def _insert(table: sa.Table, columns: list[sa.Column[Any]]) -> str:
    return (
        f"INSERT INTO {table.name} ({_quoted(columns)}) "
        f"SELECT {', '.join(_value(c) for c in columns)} FROM {_rows(columns)}"
    )


_UPDATE_SAGA = (
    f"UPDATE {sagas.name} SET "
    + ", ".join(f'"{c.name}" = %s::{_cast(c)}' for c in _SAGA_SET)
    + " WHERE saga_id = %s AND version = %s"
)
_UPDATE_STEPS = (
    f"UPDATE {steps.name} AS t SET "
    + ", ".join(f'"{c.name}" = {_value(c)}' for c in _STEP_SET)
    + f" FROM {_rows(_STEP_KEYED, ', k_version integer')}"
    + " WHERE t.saga_id = v.saga_id AND t.name = v.name AND t.version = v.k_version"
)
_INSERT_EVENTS = _insert(events, _EVENT_COLUMNS)


@functools.cache
def write_statement(saga: bool, changed_steps: bool, new_events: bool, notify: bool) -> str:
    """A decision's writes in one statement: the compare-and-sets of the saga and its
    changed steps, the events, and the NOTIFY of an ended saga. When a compare-and-set
    matches no row, the statement divides by zero: the error aborts the transaction,
    so that the COMMIT sent after it rolls everything back."""
    parts, counted = [], []
    if saga:
        parts.append(f"sg AS ({_UPDATE_SAGA} RETURNING 1)")
        counted.append("(SELECT count(*) FROM sg)")
    if changed_steps:
        parts.append(f"st AS ({_UPDATE_STEPS} RETURNING 1)")
        counted.append("(SELECT count(*) FROM st)")
    if new_events:
        parts.append(f"ev AS ({_INSERT_EVENTS})")
    check = f"1 / ({' + '.join(counted)} = %s)::int" if counted else "1"
    notice = f", pg_notify('{PG_CHANNEL}', %s)" if notify else ""
    return ("WITH " + ", ".join(parts) + " " if parts else "") + f"SELECT {check}{notice}"


# A new saga, its steps and its first events in one statement (one transaction).
INSERT_SAGA = (
    f"WITH sg AS (INSERT INTO {sagas.name} ({_quoted(list(sagas.c))}) VALUES ("
    + ", ".join(f"%s::{_cast(c)}" for c in sagas.c)
    + f")), st AS ({_insert(steps, list(steps.c))}), ev AS ({_INSERT_EVENTS}) SELECT 1"
)


def _json_row(
    row: dict[str, Any], columns: tuple[str, ...], json_columns: tuple[str, ...]
) -> dict[str, Any]:
    out = {name: row[name] for name in columns}
    for name in json_columns:
        out[name] = json.dumps(out[name])
    return out


def _names(columns: list[sa.Column[Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(c.name for c in columns), tuple(c.name for c in columns if _is_json(c))


_STEP_NAMES = _names(_STEP_KEYED)
_EVENT_NAMES = _names(_EVENT_COLUMNS)


def saga_values(saga: SagaRecord, version: int) -> list[Any]:
    """The saga's update: its columns, then the key and the version it was read at."""
    row = to_row(saga)
    row["version"] = version + 1
    values = [Json(row[c.name]) if _is_json(c) else row[c.name] for c in _SAGA_SET]
    return [*values, saga.saga_id, version]


def steps_doc(records: list[StepRecord], versions: list[int] | None = None) -> str:
    """Steps as the JSON rows of one parameter; with `versions`, each one's new version
    and the version it was read at (`k_version`)."""
    rows = []
    for i, step in enumerate(records):
        row = to_row(step)
        if versions is not None:
            row["version"] = versions[i] + 1
        out = _json_row(row, *_STEP_NAMES)
        if versions is not None:
            out["k_version"] = versions[i]
        rows.append(out)
    return json.dumps(rows)


def events_doc(events_: list[Event]) -> str:
    rows = []
    for e in events_:
        row = to_row(e)
        row["detail"] = e.detail or None  # an empty detail is stored as null
        rows.append(_json_row(row, *_EVENT_NAMES))
    return json.dumps(rows)


class PgHotPath:
    """The hot statements on the SQLAlchemy engine's pooled psycopg connections."""

    # What a store retries of the errors raised here (see sql_dialects.transient), and
    # what a refused insert raises.
    retry_errors = (psycopg.OperationalError, psycopg.InterfaceError)
    integrity_error = psycopg.IntegrityError

    def __init__(self, engine: Engine):
        self.engine = engine

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
        # Autocommit: the statement is its own transaction. In a pipeline, so that its
        # first use on a connection prepares it in the same round trip.
        with self.connection() as conn:
            with conn.pipeline():
                cur = conn.execute(CLAIM[phase], params, prepare=True)
            return cur.rowcount == 1

    def insert_saga(self, state: SagaState, events_: list[Event]) -> None:
        """The saga, its steps and events in one statement, its own transaction, in one
        round trip (IntegrityError: refused)."""
        row = to_row(state.saga)
        params = [Json(row[c.name]) if _is_json(c) else row[c.name] for c in sagas.c]
        params += [steps_doc(list(state.steps.values())), events_doc(events_)]
        with self.connection() as conn, conn.pipeline():
            conn.execute(INSERT_SAGA, params, prepare=True)

    def read_saga(self, saga_id: str) -> SagaRecord | None:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(READ_SAGA, (saga_id,), prepare=True).fetchone()
        return None if row is None else from_row(SagaRecord, row)

    @contextmanager
    def locked(
        self, saga_id: str
    ) -> Iterator[tuple[psycopg.Connection[Any], SagaRecord | None, list[StepRecord]]]:
        """The saga locked (FOR UPDATE) and read with its steps, in one round trip;
        the transaction stays open until the context exits (rolled back unless written)."""
        with self.connection() as conn:
            with conn.pipeline():
                conn.execute("BEGIN")
                saga_cur = conn.cursor(row_factory=dict_row)
                saga_cur.execute(LOCK_SAGA, (saga_id,), prepare=True)
                steps_cur = conn.cursor(row_factory=dict_row)
                steps_cur.execute(READ_STEPS, (saga_id,), prepare=True)
            row = saga_cur.fetchone()
            saga = None if row is None else from_row(SagaRecord, row)
            yield conn, saga, [from_row(StepRecord, r) for r in steps_cur.fetchall()]

    @staticmethod
    def write(conn: psycopg.Connection[Any], saga_id: str, d: Decision) -> bool:
        """Write a decision (compare-and-set on every record it changes) and commit it,
        in one round trip; False, rolled back, when one of them changed since it was read.
        """
        notify = d.saga is not None and d.saga.status in SAGA_TERMINAL
        params: list[Any] = []
        if d.saga is not None:
            params += saga_values(d.saga, d.saga_version)
        if d.steps:
            params.append(steps_doc(d.steps, [d.expected_version(s) for s in d.steps]))
        if d.events:
            params.append(events_doc(d.events))
        if d.saga is not None or d.steps:
            params.append((d.saga is not None) + len(d.steps))
        if notify:
            # Delivered at commit: wakes the callers waiting in get() (finished.py).
            params.append(pg_payload(saga_id))
        statement = write_statement(d.saga is not None, bool(d.steps), bool(d.events), notify)
        try:
            with conn.pipeline():
                conn.execute(statement, params, prepare=True)
                conn.execute("COMMIT")
        except psycopg.errors.DivisionByZero:
            return False
        return True
