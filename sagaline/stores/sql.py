"""The SQL store on SQLAlchemy 2 Core: PostgreSQL (psycopg 3), SQLite (default), MySQL/MariaDB.

What differs by database (drivers, pool and SQLite setup, which errors are
transient, PostgreSQL's one-statement claim) is in sql_dialects.py.

Locking: `transact` takes the saga row with SELECT ... FOR UPDATE (PostgreSQL,
MySQL) or a BEGIN IMMEDIATE write transaction (SQLite), so completions of one
saga are serialized while different sagas proceed in parallel. Claims and lease
renewals do not take the saga lock: they are single compare-and-set UPDATEs on
the step row, and every write of `transact` is itself a compare-and-set on the
versions it read, so a claim that slips in between is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from ..exceptions import StoreError
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
from . import schema
from .base import DEFAULT_RETRY_FOR, DueItem, Snapshot, Store
from .finished import FinishWatch, PgFinishedListener
from .rows import to_row
from .schema import events, sagas, steps
from .sql_dialects import (
    dialect_of,
    driver_url,
    engine_options_for,
    hot_path,
    sqlite_path,
    sqlite_setup,
    transient,
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
    event_record,
    event_row,
    list_query,
    saga_record,
    step_record,
    write_decision,
)


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
            sqlite_setup(self.engine)
        # The same pool; transactions on it are write transactions (BEGIN IMMEDIATE on SQLite).
        self._writer = self.engine.execution_options(sagaline_write=True)
        self._migrated = not auto_migrate
        self._migrate_lock = threading.Lock()
        # PostgreSQL runs its hot statements on psycopg (pg_hot.py) and announces ended
        # sagas (NOTIFY), which a listener per process hears.
        self._hot = hot_path(self.engine) if self.dialect == "postgresql" else None
        self._listener: PgFinishedListener | None = None
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

        def check() -> bool:
            with self.engine.connect() as conn:
                return _current_revision(conn) is not None

        return self._retrying(check)

    def migrate(self) -> None:
        if self.sqlite_path is not None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        with self.engine.connect() as conn:
            if _current_revision(conn) == schema.SCHEMA_REVISION:
                conn.rollback()
                return
            conn.rollback()
        # Imported only when there is something to migrate: it costs ~10 MB per process.
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        # Many workers may start at once: one migrates, the others wait and find it done.
        # MySQL's named lock belongs to a session, not a transaction: it is taken on a
        # connection of its own and released only after the migration has committed,
        # or a waiter would find the tables (DDL commits at once) without the revision.
        with contextlib.ExitStack() as stack:
            if self.dialect == "mysql":
                lock_conn = stack.enter_context(self.engine.connect())
                lock_conn.execute(sa.text("SELECT GET_LOCK('sagaline_migrate', 120)"))
                stack.callback(
                    lock_conn.execute, sa.text("SELECT RELEASE_LOCK('sagaline_migrate')")
                )
            with self._writer.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7366551)"))
                if _current_revision(conn) != schema.SCHEMA_REVISION:
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self.engine.dispose()

    def dispose_after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process without closing them."""
        self._listener = None
        self.engine.dispose(close=False)

    def watch_finished(self, saga_id: str) -> FinishWatch | None:
        if self._hot is None:
            return None  # SQLite and MySQL: the caller polls
        listener = self._listener
        if listener is None or listener.pid != os.getpid():
            listener = self._listener = PgFinishedListener(self._hot.listen_connection)
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
            hot = self._hot  # one round trip, the claim's commit not waiting for its flush
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
        cols = PHASE_COLUMNS[phase]
        stmt = (
            steps.update()
            .where(
                steps.c.saga_id == saga_id,
                steps.c.name == step,
                steps.c[cols.status] == cols.running.value,
                steps.c[cols.attempt] == attempt,
            )
            .values(lease_until=lease_until, due_at=lease_until, version=steps.c.version + 1)
        )

        def renew() -> bool:
            with self._write() as conn:
                return bool(conn.execute(stmt).rowcount == 1)

        return self._retrying(renew)

    @contextmanager
    def _locked(self, saga_id: str) -> Iterator[Snapshot | None]:
        self._ensure_schema()
        if self._hot is not None:
            hot = self._hot
            with hot.locked(saga_id) as (pg, saga, step_rows):
                if saga is None:
                    yield None
                    return
                yield Snapshot(
                    SagaState(saga, {s.name: s for s in step_rows}),
                    lambda decision: hot.write(pg, saga_id, decision),
                )
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

    # -- reads -------------------------------------------------------------------

    def _get_saga(self, saga_id: str) -> SagaRecord | None:
        self._ensure_schema()

        def read() -> SagaRecord | None:
            if self._hot is not None:
                return self._hot.read_saga(saga_id)
            with self._read() as conn:
                row = conn.execute(sa.select(sagas).where(sagas.c.saga_id == saga_id)).first()
                return None if row is None else saga_record(row)

        return self._retrying(read)

    def _get_steps(self, saga_id: str) -> list[StepRecord]:
        self._ensure_schema()

        def read() -> list[StepRecord]:
            with self._read() as conn:
                rows = conn.execute(
                    sa.select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.position)
                )
                return [step_record(r) for r in rows]

        return self._retrying(read)

    def _steps_of(self, saga_ids: list[str]) -> dict[str, list[StepRecord]]:
        if not saga_ids:
            return {}
        self._ensure_schema()

        def read() -> dict[str, list[StepRecord]]:
            found: dict[str, list[StepRecord]] = {}
            with self._read() as conn:
                rows = conn.execute(
                    sa.select(steps)
                    .where(steps.c.saga_id.in_(saga_ids))
                    .order_by(steps.c.saga_id, steps.c.position)
                )
                for r in rows:
                    rec = step_record(r)
                    found.setdefault(rec.saga_id, []).append(rec)
            return found

        return self._retrying(read)

    def _history(self, saga_id: str, after_seq: int) -> list[Event]:
        self._ensure_schema()

        def read() -> list[Event]:
            with self._read() as conn:
                rows = conn.execute(
                    sa.select(events)
                    .where(events.c.saga_id == saga_id, events.c.seq > after_seq)
                    .order_by(events.c.seq)
                )
                return [event_record(r) for r in rows]

        return self._retrying(read)

    def _list_sagas(self, flt: SagaFilter) -> list[SagaRecord]:
        self._ensure_schema()
        q = list_query(flt)

        def read() -> list[SagaRecord]:
            with self._read() as conn:
                return [saga_record(r) for r in conn.execute(q)]

        return self._retrying(read)

    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]:
        self._ensure_schema()
        q = count_query(name)

        def read() -> dict[SagaStatus, int]:
            counts = dict.fromkeys(SagaStatus, 0)
            with self._read() as conn:
                for status, n in conn.execute(q):
                    counts[SagaStatus(status)] = int(n)
            return counts

        return self._retrying(read)

    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        self._ensure_schema()
        q_sagas, q_steps = due_queries(now, limit)

        def read() -> list[DueItem]:
            with self._read() as conn:
                items = [DueItem(r.saga_id, None, r.due_at) for r in conn.execute(q_sagas)]
                items += [DueItem(r.saga_id, r.name, r.due_at) for r in conn.execute(q_steps)]
            items.sort(key=lambda d: d.due_at)
            return items[:limit]

        return self._retrying(read)

    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        self._ensure_schema()
        q = claimed_query(node, limit)

        def read() -> list[StepRecord]:
            with self._read() as conn:
                return [step_record(r) for r in conn.execute(q)]

        return self._retrying(read)


def _current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table(schema.VERSION_TABLE):
        return None
    row = conn.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).first()
    return None if row is None else str(row[0])
