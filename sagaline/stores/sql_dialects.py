"""What the SQL store does differently per database: drivers, engine setup, transient errors.

PostgreSQL runs on psycopg 3 (its hot statements straight on it: pg_hot.py),
MySQL/MariaDB on PyMySQL, SQLite on the standard library's driver with a write
lock taken up front.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .registry import require_extra

if TYPE_CHECKING:
    from .pg_hot import PgHotPath


def hot_path(engine: Engine) -> PgHotPath:
    """PostgreSQL's hot statements on psycopg (imported only for PostgreSQL)."""
    from .pg_hot import PgHotPath

    return PgHotPath(engine)


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


# Waiting for SQLite's write lock (begin_immediate): the first pause and the longest.
LOCK_PAUSE_FIRST = 0.0001
LOCK_PAUSE_MAX = 0.002
_LOCK_WAIT = "sagaline_lock_wait"


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
        record.info[_LOCK_WAIT] = cur.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front: a deferred one that
        # read first could fail to upgrade with SQLITE_BUSY after a concurrent commit.
        fairy = conn.connection
        if conn.get_execution_options().get("sagaline_write"):
            begin_immediate(fairy.dbapi_connection, fairy.info.get(_LOCK_WAIT, 30.0), path)
        else:
            conn.exec_driver_sql("BEGIN")


def begin_immediate(dbapi_conn: Any, wait: float, path: Path | None) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock up to `wait` seconds.

    SQLite's busy handler sleeps 1, 2, 5, 10... ms between attempts, so with a few
    processes writing one file the lock sits free for milliseconds after each
    commit. This loop tries again after pauses of 0.1 ms growing to 2 ms, jittered
    so that waiting processes do not retry in step. When the lock stayed busy for
    `wait` seconds, it raises OperationalError (SQLAlchemy's, naming the file).
    """
    try:
        dbapi_conn.execute("PRAGMA busy_timeout=0")
        try:
            _wait_for_write_lock(dbapi_conn, wait, path)
        finally:
            dbapi_conn.execute(f"PRAGMA busy_timeout={round(wait * 1000)}")
    except sqlite3.Error as exc:  # wrapped as SQLAlchemy wraps a statement's errors
        raise sa_exc.DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc


def _wait_for_write_lock(dbapi_conn: Any, wait: float, path: Path | None) -> None:
    deadline = time.monotonic() + wait
    pause = LOCK_PAUSE_FIRST
    while True:
        try:
            dbapi_conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            now = time.monotonic()
            if now >= deadline:
                where = "in memory" if path is None else str(path)
                raise sqlite3.OperationalError(
                    f"database is locked: the write lock of {where} stayed busy for {wait:g} s"
                ) from exc
        time.sleep(min(pause * random.uniform(0.5, 1.5), deadline - now))
        pause = min(pause * 1.5, LOCK_PAUSE_MAX)


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
