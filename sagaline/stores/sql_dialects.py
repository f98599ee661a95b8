"""What the SQL store does differently per database: drivers, engine setup, transient errors.

PostgreSQL runs on psycopg 3 (its hot statements straight on it: pg_hot.py),
MySQL/MariaDB on PyMySQL, SQLite on the standard library's driver with a write
lock taken up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .finished import PgFinishedListener
from .registry import require_extra
from .sqlite_lock import LOCK_WAIT_KEY, begin_immediate

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from ..records import Event, SagaRecord, SagaState
    from ..states import Phase
    from .base import Snapshot


class HotPath(Protocol):
    """The hot statements straight on a driver: pg_hot.py, sqlite_hot.py."""

    @property
    def retry_errors(self) -> tuple[type[Exception], ...]: ...

    @property
    def integrity_error(self) -> type[Exception]: ...

    def claim(self, phase: Phase, params: dict[str, Any]) -> bool: ...

    def insert_saga(self, state: SagaState, events_: list[Event]) -> None: ...

    def read_saga(self, saga_id: str) -> SagaRecord | None: ...

    def snapshot(self, saga_id: str) -> AbstractContextManager[Snapshot | None]:
        """The saga read for one decision, and how to write it (Store._locked)."""
        ...

    def dispose_after_fork(self) -> None: ...


def hot_path(engine: Engine, dialect: str, path: Path | None) -> HotPath | None:
    """The hot statements of PostgreSQL (psycopg) or SQLite, imported only for them."""
    if dialect == "postgresql":
        from .pg_hot import PgHotPath

        return PgHotPath(engine)
    if dialect == "sqlite":
        from .sqlite_hot import SqliteHotPath

        return SqliteHotPath(engine, path)
    return None


def pg_listener(engine: Engine) -> PgFinishedListener:
    """PostgreSQL's listener of ended sagas (finished.py), on a connection made like
    the pool's, decoding the ended sagas that the hot path's commits send."""
    from .pg_hot import PgHotPath, decode_ended

    return PgFinishedListener(PgHotPath(engine).listen_connection, decode_ended)


def dialect_of(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    return {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme, scheme)


def driver_url(url: str, dialect: str) -> str:
    """The URL with the driver sagaline uses, unless it names one; the driver must exist."""
    if dialect == "postgresql":
        require_extra("psycopg", "postgres")
        return url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
            "postgres://", "postgresql+psycopg://", 1
        )
    if dialect == "mysql":
        if url.startswith(("mysql://", "mariadb://")):
            url = "mysql+pymysql://" + url.split("://", 1)[1]
        require_extra("pymysql", "mysql")
    return url


def engine_options_for(dialect: str) -> dict[str, Any]:
    if dialect == "sqlite":
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {"pool_size": 5, "max_overflow": 10, "pool_recycle": 1800}


def sqlite_path(url: str) -> Path | None:
    """The database file a SQLite URL names (None: in memory)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def sqlite_setup(engine: Engine, path: Path | None) -> None:
    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        # Let SQLAlchemy's begin event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        # The driver's `timeout` (30 s unless connect_args say otherwise) bounds every
        # wait for a lock: SQLite's busy handler for most statements, ours for the write lock.
        record.info[LOCK_WAIT_KEY] = cur.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front: a deferred one that
        # read first could fail to upgrade with SQLITE_BUSY after a concurrent commit.
        fairy = conn.connection
        if conn.get_execution_options().get("sagaline_write"):
            begin_immediate(fairy.dbapi_connection, fairy.info.get(LOCK_WAIT_KEY, 30.0), path)
        else:
            conn.exec_driver_sql("BEGIN")


# PostgreSQL SQLSTATE classes worth waiting out: connection (08), transaction
# rollback: deadlock/serialization (40), operator intervention: restarts (57),
# insufficient resources (53). MySQL: lost/refused connections, deadlock, lock wait.
_PG_TRANSIENT = ("08", "40", "53", "57")
_MYSQL_TRANSIENT = {1040, 1205, 1213, 2002, 2003, 2006, 2013, 2055}


def transient(exc: BaseException) -> bool:
    """Whether a failed statement may succeed if tried again (a server restart, a lock)."""
    if isinstance(exc, sa_exc.InterfaceError) or getattr(exc, "connection_invalidated", False):
        return True
    orig = getattr(exc, "orig", exc)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return str(sqlstate).startswith(_PG_TRANSIENT)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_TRANSIENT
    text = str(orig).lower()
    # psycopg connection failures carry no SQLSTATE; SQLite reports locks as text.
    return any(
        word in text
        for word in ("locked", "busy", "connect", "closed", "terminat", "timeout", "timed out")
    )
