"""Waiting for a saga's end on SQLite: peeking at the file, not reading the saga.

SQLite sends no notification, so a caller's `get()` must look. Reading the saga
through the store every few milliseconds costs a full row and its conversion, and
leaves the caller up to one pause behind the commit that ended it. A peek costs
a few microseconds: `PRAGMA data_version` on a connection of its own (it changes
when any other connection commits), and only when it changed, the saga's status
by its primary key. So the watch can look every 0.5 ms while most sagas end,
then back off for long ones; `get()` reads the saga through the store once
before waiting and once after, as on the stores that notify.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from ..states import SAGA_TERMINAL
from .finished import FinishWatch
from .schema import sagas

# Pauses between peeks: PEEK_FIRST for the first PEEK_FAST_FOR seconds of a wait,
# then growing by half each time up to PEEK_MAX.
# Each peek is also a sleep and a wake-up, which cost the caller's CPU more than the
# peek itself (about 45 µs a peek on the 2-core development machine): 0.5 ms instead
# of 0.25 ms halves what a caller waiting on a busy store takes from workers on the
# same machine (1,000 sagas at once: 5-10% more sagas per second), for about 0.05 ms
# more from the commit to `get()`'s return (README, *Benchmarks*).
PEEK_FIRST = 0.0005
PEEK_FAST_FOR = 1.0
PEEK_MAX = 0.05

_STATUS = f"SELECT status FROM {sagas.name} WHERE saga_id = ?"
_TERMINAL = frozenset(s.value for s in SAGA_TERMINAL)


class SqlitePeek:
    """Connections that only peek at one SQLite file: one per thread and process."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # none yet, or inherited by a fork
            # Autocommit: every peek reads the latest commit. The short timeout only
            # covers SQLite's rare busy reads in WAL mode (a peek that fails wakes
            # the caller, whose store read has its own retries).
            local.conn = sqlite3.connect(self.path, timeout=0.1, isolation_level=None)
            local.pid = os.getpid()
        conn: sqlite3.Connection = local.conn
        return conn

    def watch(self, saga_id: str) -> SqliteWatch:
        return SqliteWatch(self, saga_id)


class SqliteWatch(FinishWatch):
    """Peeks until the saga is terminal (or gone); see the module's docstring."""

    def __init__(self, peek: SqlitePeek, saga_id: str):
        self.saga_id = saga_id
        self._peek = peek
        self._started = time.monotonic()
        self._pause = PEEK_FIRST
        self._failed = False

    @property
    def live(self) -> bool:
        return not self._failed  # a peek that failed leaves the caller to poll

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        version = None
        while True:
            try:
                conn = self._peek.connection()
                seen = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen != version:
                    version = seen
                    row = conn.execute(_STATUS, (self.saga_id,)).fetchone()
                    if row is None or row[0] in _TERMINAL:
                        return True
            except sqlite3.Error:
                self._failed = True
                return True  # the caller's store read says what is wrong
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(self._pause, deadline - now))
            if now - self._started >= PEEK_FAST_FOR:
                self._pause = min(self._pause * 1.5, PEEK_MAX)
