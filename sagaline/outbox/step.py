"""`sagaline.step_transaction()`: a step's database writes, its events and its completion
in one transaction.

The transaction opens on the saga store's database when the `with` block starts and
stays open after it ends: it commits when the step (or compensation) returns, with the
step's completion — its output, and its successors marked DISPATCHED — written in it.
So the business writes, the outbox rows and the completion commit together or not at
all. A crash before the commit leaves nothing (the next attempt starts clean); after
it, the step is complete and its claim fenced, so it never runs again. If the claim was
lost meanwhile (its lease expired and another attempt took over), the completion finds
the step no longer this attempt's and everything is rolled back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..context import StepInfo
from ..exceptions import ConcurrencyError, ConfigurationError
from ..records import Decision, SagaState
from ..states import SAGA_TERMINAL
from ..stores.finished import PG_CHANNEL, pg_payload
from ..stores.sanitize import storable_records

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from ..runtime import Runtime

# SQLAlchemy and the SQL statements are imported where a step transaction uses them:
# a worker whose steps open none (and every worker on the Redis store) never loads them.

log = logging.getLogger("sagaline")

# Compare-and-set races (a lease renewal between the read and the write) retried
# inside the transaction, each from a savepoint, before giving up.
MAX_DECISIONS = 20


class StepTransaction:
    """The open transaction of one step attempt (see `step_transaction`)."""

    def __init__(self, connection: Connection, info: StepInfo):
        self.connection = connection
        self.info = info
        self.event_ids: list[str] = []
        self.closed = False

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        """`self.connection.execute(...)`."""
        return self.connection.execute(statement, *args, **kwargs)

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Add an event to the outbox in this transaction. Its id is
        `<saga_id>:<step>:<n>` (compensations: `<saga_id>:<step>:compensate:<n>`), the
        same in every attempt, so a consumer recognises a re-sent event."""
        if self.closed:
            raise RuntimeError("this step transaction has ended (rolled back by an error)")
        event_id = f"{self.info.idempotency_key}:{len(self.event_ids) + 1}"
        from .events import insert_event

        insert_event(self.connection, topic, payload, key=key, headers=headers, event_id=event_id)
        self.event_ids.append(event_id)
        return event_id

    def rollback(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.connection.rollback()
            finally:
                self.connection.close()


@dataclass
class _Scope:
    runtime: Runtime
    info: StepInfo
    tx: StepTransaction | None = None


_scope: ContextVar[_Scope | None] = ContextVar("sagaline_step_transaction", default=None)

# Called with the event ids of each committed step transaction (the relay's
# optimistic sending registers itself here).
committed_hooks: list[Callable[[Runtime, list[str]], None]] = []


def enter(runtime: Runtime, info: StepInfo) -> Token[_Scope | None]:
    """Called by the executor around a step body."""
    return _scope.set(_Scope(runtime, info))


def leave(token: Token[_Scope | None]) -> None:
    """Rolls back a transaction the step left open (its completion never came)."""
    scope = _scope.get()
    try:
        if scope is not None and scope.tx is not None:
            scope.tx.rollback()
    finally:
        _scope.reset(token)


def abandon() -> None:
    """The body failed: roll back its transaction before its failure is recorded."""
    scope = _scope.get()
    if scope is not None and scope.tx is not None:
        scope.tx.rollback()
        scope.tx = None


def is_open() -> bool:
    scope = _scope.get()
    return scope is not None and scope.tx is not None and not scope.tx.closed


@contextmanager
def step_transaction(database: Any = None) -> Iterator[StepTransaction]:
    """Open (or rejoin) the step's transaction on the saga store's database.

    Use `tx.connection` for your writes and `tx.publish(...)` for events; everything
    commits with the step's completion when the step returns. An exception leaving
    the block rolls it back. `database` (your Engine or URL), when given, is checked
    to be the store's database: one transaction cannot span two.
    """
    scope = _scope.get()
    if scope is None:
        raise RuntimeError(
            "sagaline.step_transaction() is for the body of a saga step or "
            "compensation; elsewhere use your own transaction and "
            "sagaline.outbox.publish(connection, ...)"
        )
    if scope.tx is None or scope.tx.closed:
        conn = _connect(scope.runtime)
        if database is not None:
            _same_database(conn, database)
        scope.tx = StepTransaction(conn, scope.info)
    tx = scope.tx
    try:
        yield tx
    except BaseException:
        tx.rollback()
        scope.tx = None
        raise


def _connect(runtime: Runtime) -> Connection:
    from ..stores.sql import SQLStore

    store = runtime.store
    if not isinstance(store, SQLStore):
        from ..stores.memory import MemoryStore

        hint = (
            "; in tests (saga_env, explore_failures), run pytest with "
            "--sagaline-store=sqlite (or a postgresql:// URL)"
            if isinstance(store, MemoryStore)
            else ""
        )
        raise ConfigurationError(
            f"sagaline.step_transaction() needs a SQL saga store (PostgreSQL, MySQL/MariaDB "
            f"or SQLite) in the database that holds your tables; this app's store is "
            f"{type(store).__name__}, which cannot take part in a SQL transaction, so the "
            f"step's completion could not commit with your writes{hint}"
        )
    options: dict[str, Any] = {"sagaline_write": True}
    if store.dialect == "mysql":
        # The completion re-reads the saga after a lost compare-and-set: it must see
        # the latest commit, not the snapshot of REPEATABLE READ.
        options["isolation_level"] = "READ COMMITTED"
    conn = store.engine.execution_options(**options).connect()
    conn.begin()
    return conn


def _same_database(conn: Connection, database: Any) -> None:
    import sqlalchemy as sa

    url = sa.make_url(database) if isinstance(database, str) else getattr(database, "url", None)
    if url is None:
        raise TypeError(f"database= takes an Engine or a URL, got {type(database).__name__}")
    mine = conn.engine.url

    def where(u: sa.URL) -> tuple[Any, ...]:
        return (u.get_backend_name(), u.host or "localhost", u.port, u.database)

    if where(url) != where(mine):
        conn.close()
        raise ConfigurationError(
            f"sagaline.step_transaction(): your tables are in "
            f"{url.render_as_string(hide_password=True)}, the saga store in "
            f"{mine.render_as_string(hide_password=True)}; one transaction cannot span two "
            f"databases, so the step's completion could not commit with your writes. Keep "
            f"the saga store in your database, or publish with sagaline.outbox.publish in "
            f"your own transaction"
        )


def commit(
    runtime: Runtime,
    saga_id: str,
    decide: Callable[..., Decision | None],
    *args: Any,
    **kwargs: Any,
) -> Decision | None:
    """Write the step's completion (`decide`, an engine function, as `Runtime.apply`
    calls it) in the open step transaction and commit; None when the attempt no longer
    holds its claim (everything is rolled back then)."""
    scope = _scope.get()
    assert scope is not None and scope.tx is not None
    tx, scope.tx = scope.tx, None
    conn = tx.connection
    try:
        decision = _decide_and_write(runtime, conn, saga_id, decide, args, kwargs)
        if decision is None:
            log.warning(
                "saga %s step %s attempt %s: the step no longer holds its claim; "
                "its transaction is rolled back",
                saga_id,
                tx.info.step,
                tx.info.attempt,
            )
            tx.rollback()
            return None
        conn.commit()
    except BaseException:
        tx.rollback()
        raise
    tx.closed = True
    conn.close()
    if tx.event_ids:
        for hook in committed_hooks:
            try:
                hook(runtime, tx.event_ids)
            except Exception:
                log.exception(
                    "could not hand committed events to the relay; it will find them in the outbox"
                )
    runtime.after_commit(decision)
    return decision


def _decide_and_write(
    runtime: Runtime,
    conn: Connection,
    saga_id: str,
    decide: Callable[..., Decision | None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Decision | None:
    import sqlalchemy as sa

    from ..stores.sql_statements import (
        LOCK_SAGA,
        SAGA_LABELS,
        STATE,
        STEP_LABELS,
        saga_record,
        step_record,
        write_decision,
    )

    sqlite = conn.dialect.name == "sqlite"
    for _ in range(MAX_DECISIONS):
        savepoint = conn.begin_nested()
        if not sqlite:
            conn.execute(LOCK_SAGA, {"k_saga_id": saga_id})
        rows = conn.execute(STATE, {"k_saga_id": saga_id}).all()
        if not rows:
            savepoint.rollback()
            return None
        state = SagaState(
            saga_record(rows[0], SAGA_LABELS), {r.s_name: step_record(r, STEP_LABELS) for r in rows}
        )
        defn = runtime.definition_for(state.saga)
        decision = (
            None
            if defn is None
            else decide(defn, state, *args, now=runtime.now(), timing=runtime.timing, **kwargs)
        )
        if decision is None or not decision.changed:
            savepoint.rollback()
            return None
        storable_records(decision.saga, decision.steps, decision.events)
        if write_decision(conn, saga_id, decision):
            savepoint.commit()
            if (
                not sqlite
                and decision.saga is not None
                and decision.saga.status in SAGA_TERMINAL
                and conn.dialect.name == "postgresql"
            ):
                # As the store does (pg_hot.py): callers waiting in get() wake at commit.
                conn.execute(
                    sa.text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": PG_CHANNEL, "payload": pg_payload(saga_id)},
                )
            return decision
        savepoint.rollback()  # a lease renewal slipped in: read again
    raise ConcurrencyError(f"saga {saga_id!r}: too many concurrent updates")
