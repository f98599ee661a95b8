"""The SQLite store's own wait for the write lock (sql_dialects.begin_immediate).

Another connection holds the write lock with BEGIN IMMEDIATE, as a worker
completing a step would: a write of the store waits for it, proceeds within
milliseconds of its release, and when it is held past the driver's `timeout`,
fails with an error that names the database file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagaline.exceptions import StoreError
from sagaline.records import SagaState
from sagaline.stores.sql import SQLStore
from tests.stores import make_state


def open_store(path: Path, timeout: float) -> SQLStore:
    # retry_for=0: the store's own retries would hide the error of one wait.
    return SQLStore(
        f"sqlite:///{path}",
        retry_for=0,
        connect_args={"timeout": timeout, "check_same_thread": False},
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    st = open_store(path, 5)
    st.migrate()
    st.close()
    return path


@pytest.fixture
def holder(db: Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own, ready to take the write lock."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.rollback()
        conn.close()


def start_writing(st: SQLStore, state: SagaState) -> tuple[threading.Thread, threading.Event]:
    """A thread that inserts the saga, then sets the event."""
    done = threading.Event()

    def write() -> None:
        st.create_saga(state, [])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    return writer, done


def test_a_write_waits_for_the_lock_and_proceeds_promptly_once_it_is_released(
    db: Path, holder: sqlite3.Connection
) -> None:
    st = open_store(db, 5)
    try:
        lags = []
        for _ in range(3):
            state = make_state()
            holder.execute("BEGIN IMMEDIATE")
            writer, done = start_writing(st, state)
            # Held for 0.35 s: SQLite's own busy handler would sleep 100 ms at a
            # time by then, and see the lock free only ~80 ms after its release.
            time.sleep(0.35)
            assert not done.is_set(), "the write did not wait for the write lock"
            # Reads do not wait for the write lock (WAL).
            assert st.get_saga(state.saga.saga_id) is None
            holder.commit()
            released = time.monotonic()
            assert done.wait(10), "the write never took the released lock"
            lags.append(time.monotonic() - released)
            writer.join(10)
            assert st.get_saga(state.saga.saga_id) is not None
        # The best of three, so that one slow thread wake-up on a loaded machine
        # does not decide; the retry pauses are at most ~3 ms.
        assert min(lags) < 0.03, lags
        # The driver's timeout still guards every other statement's wait.
        with st.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        st.close()


def test_a_write_lock_held_past_the_timeout_fails_naming_the_database_file(
    db: Path, holder: sqlite3.Connection
) -> None:
    st = open_store(db, 0.2)
    try:
        holder.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            st.create_saga(make_state(), [])
        waited = time.monotonic() - t0
        assert f"the write lock of {db} stayed busy for 0.2 s" in str(err.value)
        assert 0.2 <= waited < 5, waited
        holder.commit()
        # Nothing is left behind: the next write takes the lock at once.
        state = make_state()
        st.create_saga(state, [])
        assert st.get_saga(state.saga.saga_id) is not None
    finally:
        st.close()
