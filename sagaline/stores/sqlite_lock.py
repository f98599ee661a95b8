"""Taking SQLite's write lock: BEGIN IMMEDIATE, waited for by the store, not by SQLite."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc

# Waiting for SQLite's write lock (begin_immediate): the first pause and the longest.
LOCK_PAUSE_FIRST = 0.0001
LOCK_PAUSE_MAX = 0.002
# Where a pooled connection keeps its lock wait (the driver's timeout), in its info.
LOCK_WAIT_KEY = "sagaline_lock_wait"


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
