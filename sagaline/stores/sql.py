"""The SQL store on SQLAlchemy 2 Core: PostgreSQL (psycopg 3), SQLite (default), MySQL/MariaDB.

What differs by database (drivers, pool and SQLite setup, which errors are
transient) is in sql_dialects.py; the hot statements of PostgreSQL and SQLite, straight
on their drivers, in pg_hot.py and sqlite_hot.py; the other statements in
sql_statements.py, the reads in sql_reads.py, the migrations in sql_migrate.py.

Locking: `transact` takes the saga row with SELECT ... FOR UPDATE (PostgreSQL,
MySQL) or a BEGIN IMMEDIATE write transaction (SQLite), so completions of one
saga are serialized while different sagas proceed in parallel. Claims and lease
renewals do not take the saga lock: they are single compare-and-set UPDATEs on
the step row, and every write of `transact` is itself a compare-and-set on the
versions it read, so a claim that slips in between is never overwritten. On
PostgreSQL a step's completion decides on what its claim read, without the lock,
and its write loses to any decision written since (pg_hot.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from ..exceptions import StoreError
from ..forking import child_safe_lock
from ..records import (
    PHASE_COLUMNS,
    Decision,
    Event,
    Owner,
    SagaFilter,
    SagaRecord,
    SagaState,
    StepRecord,
)
from ..states import Phase, SagaStatus
from . import sql_gc
from .base import DEFAULT_RETRY_FOR, DueItem, Snapshot, Store
from .finished import FinishWatch, PgFinishedListener
from .pg_partitions import MonthsAhead
from .retention import GcRemoved, GcRule, GcTree
from .rows import to_row
from .schema import events, sagas, steps
from .sql_dialects import (
    dialect_of,
    driver_url,
    engine_options_for,
    hot_path,
    pg_listener,
    sqlite_path,
    sqlite_setup,
    transient,
)
from .sql_migrate import has_schema
from .sql_migrate import migrate as migrate_schema
from .sql_reads import (
    read_counts,
    read_due,
    read_history,
    read_history_tail,
    read_saga,
    read_steps,
    read_steps_of,
)
from .sql_statements import (
    CLAIM,
    LOCK_SAGA,
    SAGA_LABELS,
    STATE,
    STEP_LABELS,
    claimed_query,
    count_query,
    due_queries,
    event_row,
    list_query,
    renew_statement,
    saga_record,
    step_record,
    write_decision,
)
from .sqlite_watch import SqlitePeek

T = TypeVar("T")


class SQLStore(Store):
    def __init__(
        self,
        url: str,
        *,
        retry_for: float = DEFAULT_RETRY_FOR,
        echo: bool = False,
        auto_migrate: bool = True,
        **engine_options: Any,
    ):
        self.url = url
        self.retry_for = retry_for
        self.dialect = dialect_of(url)
        # The SQLite file, when the URL names one (created by `migrate`, never by reads).
        self.sqlite_path = sqlite_path(url) if self.dialect == "sqlite" else None
        options: dict[str, Any] = {
            "echo": echo,
            "future": True,
            **engine_options_for(self.dialect),
            **engine_options,
        }
        self.engine: Engine = sa.create_engine(driver_url(url, self.dialect), **options)
        if self.dialect == "sqlite":
            sqlite_setup(self.engine, self.sqlite_path)
        # The same pool; transactions on it are write transactions (BEGIN IMMEDIATE on SQLite).
        self._writer = self.engine.execution_options(sagaline_write=True)
        self._migrated = not auto_migrate
        self._migrate_lock = child_safe_lock()
        # Hot statements straight on the driver (pg_hot.py, sqlite_hot.py); get() hears
        # PostgreSQL's NOTIFY, or peeks at the SQLite file (sqlite_watch.py).
        self._hot = hot_path(self.engine, self.dialect, self.sqlite_path)
        self._listener: PgFinishedListener | None = None
        self._peek = None if self.sqlite_path is None else SqlitePeek(self.sqlite_path)
        # PostgreSQL: the event partitions of the months ahead (pg_partitions.py).
        self._months = MonthsAhead(self._writer) if self.dialect == "postgresql" else None
        self._integrity_errors: tuple[type[Exception], ...] = (sa_exc.IntegrityError,)
        if self._hot is not None:
            self._retry_errors = (*self._retry_errors, *self._hot.retry_errors)
            self._integrity_errors += (self._hot.integrity_error,)

    # -- plumbing ----------------------------------------------------------------

    def _ensure_schema(self) -> None:
        if self._migrated:
            return
        with self._migrate_lock:
            if not self._migrated:
                self._retrying(self.migrate)
                self._migrated = True

    _retry_errors: tuple[type[BaseException], ...] = (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
    )

    def _is_transient(self, exc: BaseException) -> bool:
        return transient(exc)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def exists(self) -> bool:
        """Whether the database holds sagaline's schema (a missing SQLite file stays missing)."""
        if self.sqlite_path is not None and not self.sqlite_path.is_file():
            return False
        return self._retrying(lambda: has_schema(self.engine))

    def migrate(self) -> None:
        migrate_schema(self.engine, self._writer, self.dialect, self.sqlite_path)
        if self._months is not None:
            self._months.check()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self.engine.dispose()

    def dispose_after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process without closing them."""
        self._listener = None
        if self._hot is not None:
            self._hot.dispose_after_fork()
        self.engine.dispose(close=False)

    def watch_finished(self, saga_id: str) -> FinishWatch | None:
        if self._peek is not None:
            return self._peek.watch(saga_id)
        if self.dialect != "postgresql":
            return None  # MySQL, SQLite in memory: the caller polls
        listener = self._listener
        if listener is None or listener.pid != os.getpid():
            listener = self._listener = pg_listener(self.engine)
        return listener.watch(saga_id)

    # -- writes ------------------------------------------------------------------

    def _insert_saga(self, state: SagaState, events_: list[Event]) -> tuple[SagaRecord, bool]:
        self._ensure_schema()
        saga = state.saga

        def attempt() -> tuple[SagaRecord, bool]:
            try:
                if self._hot is not None:
                    self._hot.insert_saga(state, events_)
                else:
                    with self._write() as conn:
                        conn.execute(sagas.insert(), to_row(saga))
                        conn.execute(steps.insert(), [to_row(s) for s in state.steps.values()])
                        if events_:  # an empty executemany would insert a row of defaults
                            conn.execute(events.insert(), [event_row(e) for e in events_])
                return saga, True
            except self._integrity_errors:
                if saga.idempotency_key is None:
                    raise
                with self._read() as conn:
                    row = conn.execute(
                        sa.select(sagas).where(
                            sagas.c.name == saga.name,
                            sagas.c.idempotency_key == saga.idempotency_key,
                        )
                    ).first()
                if row is None:
                    # A constraint refused the insert, yet no saga holds the key (its
                    # owner rolled back, or another constraint failed): not a transient
                    # failure to wait out, so say what happened at once.
                    raise StoreError(
                        f"saga {saga.saga_id!r} was refused, but no saga {saga.name!r} holds "
                        f"idempotency key {saga.idempotency_key!r}"
                    ) from None
                return saga_record(row), False

        return self._retrying(attempt)

    def claim_step(
        self,
        saga_id: str,
        step: str,
        phase: Phase,
        attempt: int,
        *,
        lease_until: float,
        now: float,
        owner: Owner | None = None,
    ) -> bool:
        self._ensure_schema()
        params = {
            "k_saga_id": saga_id,
            "k_name": step,
            "k_attempt": attempt,
            "k_now": now,
            "k_lease_until": lease_until,
            "k_kind": PHASE_COLUMNS[phase].started,
            "k_phase": phase.value,
            "k_owner_node": None if owner is None else owner.node,
            "k_owner_boot": None if owner is None else owner.boot,
            "k_owner_pid": None if owner is None else owner.pid,
        }
        if self._hot is not None:
            hot = self._hot  # PostgreSQL: one round trip, its commit not waiting for its flush
            return self._retrying(lambda: hot.claim(phase, params))
        stmt = CLAIM[phase]
        event = event_row(
            Event(saga_id, PHASE_COLUMNS[phase].started, now, step, attempt, phase.value)
        )

        def attempt_claim_tx() -> bool:
            with self._write() as conn:
                if conn.execute(stmt, params).rowcount != 1:
                    return False
                conn.execute(events.insert(), event)
                return True

        return self._retrying(attempt_claim_tx)

    def renew_lease(
        self, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
    ) -> bool:
        stmt = renew_statement(saga_id, step, phase, attempt, lease_until)

        def renew() -> bool:
            with self._write() as conn:
                return bool(conn.execute(stmt).rowcount == 1)

        return self._retrying(renew)

    @contextmanager
    def _locked(self, saga_id: str) -> Iterator[Snapshot | None]:
        self._ensure_schema()
        if self._hot is not None:
            with self._hot.snapshot(saga_id) as snapshot:
                yield snapshot
            return
        with self._write() as conn:
            if self.dialect != "sqlite":
                # Lock the saga row first, in its own statement: a statement that waited
                # for a lock still reads the other tables from the snapshot it started
                # with (PostgreSQL READ COMMITTED), so a joined locking read could miss
                # the step a concurrent completion just wrote. Only the saga row is
                # locked, so claims (step rows) never wait for a completion. SQLite's
                # BEGIN IMMEDIATE already holds the write lock before the read.
                conn.execute(LOCK_SAGA, {"k_saga_id": saga_id})
            # The saga and its steps in one query; the saga row is the lock.
            rows = conn.execute(STATE, {"k_saga_id": saga_id}).all()
            if not rows:
                yield None
                return
            state = SagaState(
                saga_record(rows[0], SAGA_LABELS),
                {r.s_name: step_record(r, STEP_LABELS) for r in rows},
            )

            def write(decision: Decision) -> bool:
                if write_decision(conn, saga_id, decision):
                    return True
                conn.rollback()
                return False

            yield Snapshot(state, write)

    # -- reads ------------------------------------------------------------------

    def _reading(self, read: Callable[[Connection], T]) -> T:
        """`read` on a connection of the pool, retried as every read is (sql_reads.py)."""

        def attempt() -> T:
            with self._read() as conn:
                return read(conn)

        return self._retrying(attempt)

    def _get_saga(self, saga_id: str) -> SagaRecord | None:
        self._ensure_schema()
        if self._hot is not None:
            hot = self._hot
            return self._retrying(lambda: hot.read_saga(saga_id))
        return self._reading(lambda conn: read_saga(conn, saga_id))

    def _get_steps(self, saga_id: str) -> list[StepRecord]:
        self._ensure_schema()
        return self._reading(lambda conn: read_steps(conn, saga_id))

    def _steps_of(self, saga_ids: list[str]) -> dict[str, list[StepRecord]]:
        if not saga_ids:
            return {}
        self._ensure_schema()
        return self._reading(lambda conn: read_steps_of(conn, saga_ids))

    def _history(self, saga_id: str, after_seq: int, limit: int | None) -> list[Event]:
        self._ensure_schema()
        return self._reading(lambda conn: read_history(conn, saga_id, after_seq, limit))

    def _history_tail(self, saga_id: str, limit: int, before_seq: int | None) -> list[Event]:
        self._ensure_schema()
        return self._reading(lambda conn: read_history_tail(conn, saga_id, limit, before_seq))

    def _list_sagas(self, flt: SagaFilter) -> list[SagaRecord]:
        self._ensure_schema()
        q = list_query(flt)
        return self._reading(lambda conn: [saga_record(r) for r in conn.execute(q)])

    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]:
        self._ensure_schema()
        q = count_query(name)
        return self._reading(lambda conn: read_counts(conn, q))

    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        self._ensure_schema()
        if self._months is not None:  # the sweeper's pass, in long-running workers
            self._months.check_hourly()
        q_sagas, q_steps = due_queries(now, limit)
        return self._reading(lambda conn: read_due(conn, q_sagas, q_steps, limit))

    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        self._ensure_schema()
        q = claimed_query(node, limit)
        return self._reading(lambda conn: [step_record(r) for r in conn.execute(q)])

    def _gc_candidates(
        self, rule: GcRule, name: str | None, limit: int, after: str | None
    ) -> tuple[list[tuple[str, SagaStatus]], str | None]:
        self._ensure_schema()
        with self._read() as conn:
            return sql_gc.candidates(conn, rule, name, limit, after)

    def _gc_children(self, ids: list[str]) -> list[tuple[str, str, SagaStatus]]:
        return self._reading(lambda conn: sql_gc.children(conn, ids))

    def _gc_count(self, trees: list[GcTree]) -> GcRemoved:
        return self._reading(lambda conn: sql_gc.count(conn, trees))

    def _gc_delete(self, trees: list[GcTree], rule: GcRule) -> GcRemoved:
        with sql_gc.writer(self._writer, self.dialect).begin() as conn:
            return sql_gc.delete(conn, trees, rule, self.dialect)

    def _gc_prepare(self, rule: GcRule) -> GcRule:
        return self._reading(lambda conn: sql_gc.prepare(conn, rule, self.dialect))

    def _gc_finish(self, rule: GcRule) -> list[str]:
        with self._write() as conn:
            return sql_gc.drop_partitions(conn, rule, self.dialect)
