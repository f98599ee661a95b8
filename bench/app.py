"""The Celery app of the benchmarks: no-op steps for sagaline, the same no-ops for plain chains.

`BENCH_FLAVOR` decides what a process sets up:

- ``sagaline``: a sagaline worker (`init_app`, store from SAGALINE_STORE_URL) that
  consumes queue ``bench.saga``; no result backend, as sagaline needs none;
- ``plain``: a plain Celery worker with a Redis result backend that consumes
  ``bench.plain``; it never imports sagaline, so its memory is plain Celery's;
- ``caller`` (default): the benchmark driver; `bench.__main__` calls `init_app`
  itself for each store it measures. It has no result backend either: it reads
  the baseline's results by polling their keys (bench/waits.py), so sending a task
  never subscribes to Celery's pub/sub result consumer.

`BENCH_COUNT_SQL=1` counts, in every process, SQL statements (at psycopg's cursor
on PostgreSQL, at sqlite3's trace callback on SQLite, elsewhere SQLAlchemy's
``before_cursor_execute``), transactions, commits and rollbacks, published task
messages (``before_task_publish``) and executed tasks, while counting is switched on
(`set_counting`, for the figures that report counts: R1). The rest of the time every
hook returns at once, so that the timed figures measure sagaline without the cost of
counting, which the plain worker does not pay for SQL. Workers add their counts to the Redis
hash ``bench:counts:<flavor>:<main|child>`` from a thread every 0.5 s, so no task
waits on the counting; the same thread reads the switch (``bench:counting``, read
with STRLEN, a command nothing else sends) at each pass. The caller reads its own
counts in process (`COUNTS`).
The same thread hands over, in the hash ``bench:finished``, the CLOCK_MONOTONIC time
at which each saga of G1 (``bench.g1``) ended: once the commit that ended it returned
in the pool process (bench/get_latency.py).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    before_task_publish,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_ready,
)

FLAVOR = os.environ.get("BENCH_FLAVOR", "caller")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
RESULT_URL = os.environ.get("BENCH_RESULT_URL", BROKER_URL)
COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", RESULT_URL)
COUNT = os.environ.get("BENCH_COUNT_SQL") == "1"

SAGA_QUEUE = "bench.saga"
PLAIN_QUEUE = "bench.plain"
# Where saga steps go: a worker's own queue (BENCH_SAGA_QUEUE), or in the caller the
# queue of the next sagas (bench/observability.py alternates two sagaline workers).
ROUTE = {"saga": os.environ.get("BENCH_SAGA_QUEUE", SAGA_QUEUE)}
# Saga lengths defined for S1 (and 4 for L1/T1/H1/R1).
SAGA_LENGTHS = (4, 8, 16, 64)
# G1's saga, whose end the workers stamp into FINISHED_KEY: saga id -> time.monotonic().
G1_SAGA = "bench.g1"
FINISHED_KEY = "bench:finished"

app = Celery("bench", broker=BROKER_URL, backend=RESULT_URL if FLAVOR == "plain" else None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_routes=(lambda name, *_, **__: _route(name),),
    result_expires=3600,
)


def _route(name: str) -> dict[str, str] | None:
    if name.startswith("bench.saga."):
        return {"queue": ROUTE["saga"]}
    if name.startswith("bench.plain."):
        return {"queue": PLAIN_QUEUE}
    return None


class BenchFailure(RuntimeError):
    """The failure of the failing step (L2)."""


# -- baseline: plain Celery tasks chained by Celery -----------------------------------


@app.task(name="bench.plain.noop")
def plain_noop(prev: Any = None) -> None:
    return None


@app.task(name="bench.plain.fail")
def plain_fail(prev: Any = None) -> None:
    raise BenchFailure("step 4 fails on purpose")


@app.task(name="bench.plain.undo")
def plain_undo(prev: Any = None) -> None:
    return None


# -- sagaline: the same no-ops as saga steps ---------------------------------------------


@app.task(name="bench.saga.noop")
def saga_noop(saga_id: str) -> None:
    return None


@app.task(name="bench.saga.fail")
def saga_fail(saga_id: str) -> None:
    raise BenchFailure("step 4 fails on purpose")


@app.task(name="bench.saga.undo")
def saga_undo(saga_id: str, compensation_data: Any = None) -> None:
    return None


SAGAS: dict[str, Any] = {}

if FLAVOR != "plain":
    import sagaline
    from sagaline import Saga

    if FLAVOR == "sagaline":
        sagaline.init_app(app)  # the store comes from SAGALINE_STORE_URL

    for _n in SAGA_LENGTHS:
        _saga = Saga(f"bench.noop{_n}")
        for _i in range(1, _n + 1):
            _saga.add_step(saga_noop, name=f"s{_i}", compensate=saga_undo)
        SAGAS[f"noop{_n}"] = _saga
    SAGAS["fail4"] = (
        Saga("bench.fail4")
        .add_step(saga_noop, name="s1", compensate=saga_undo)
        .add_step(saga_noop, name="s2", compensate=saga_undo)
        .add_step(saga_noop, name="s3", compensate=saga_undo)
        .add_step(saga_fail, name="s4", compensate=saga_undo)
    )
    # Two steps: the caller waits in get() for the second one to end.
    SAGAS["g1"] = (
        Saga(G1_SAGA)
        .add_step(saga_noop, name="s1", compensate=saga_undo)
        .add_step(saga_noop, name="s2", compensate=saga_undo)
    )


# -- readiness ------------------------------------------------------------------------------


@worker_ready.connect
def _touch_ready_file(**_: Any) -> None:
    # init_app's own hook does this for the sagaline worker; the plain worker never
    # imports sagaline (its memory is plain Celery's), so it announces itself here.
    if FLAVOR != "plain":
        return
    path = os.environ.get("SAGALINE_READY_FILE")
    if path:
        Path(path).touch()


# -- counting (BENCH_COUNT_SQL=1) ---------------------------------------------------------------


class Counts:
    """Counters of one process; `take()` hands over what was counted since the last take.

    Also times stamped by key (`stamp`, `take_stamps`): G1's ended sagas.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()
        self.total: collections.Counter[str] = collections.Counter()
        self.stamps: dict[str, float] = {}

    def add(self, key: str, n: int = 1) -> None:
        if not COUNTING.is_set():
            return
        with self._lock:
            self._pending[key] += n
            self.total[key] += n

    def take(self) -> collections.Counter[str]:
        with self._lock:
            pending, self._pending = self._pending, collections.Counter()
        return pending

    def stamp(self, key: str, at: float) -> None:
        with self._lock:
            self.stamps[key] = at

    def take_stamps(self) -> dict[str, float]:
        with self._lock:
            stamps, self.stamps = self.stamps, {}
        return stamps

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.total)


COUNTS = Counts()
# Whether the hooks count (see the module's docstring); the caller's is set in process.
# Counts.add checks it; the per-statement hooks check it first too, to skip their parsing.
COUNTING = threading.Event()
COUNTING_KEY = "bench:counting"


def set_counting(client: Any, on: bool) -> None:
    """Switch counting on or off in the caller now, in the workers at their next flush."""
    if on:
        client.set(COUNTING_KEY, "1")
        COUNTING.set()
    else:
        client.delete(COUNTING_KEY)
        COUNTING.clear()


_role = {"name": "caller" if FLAVOR == "caller" else "main"}


def _on_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    # PostgreSQL's are counted at psycopg's cursor, SQLite's by its trace callback.
    if conn.dialect.name not in ("postgresql", "sqlite"):
        _count_statement(statement)


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    """SQLite's hot statements run on sqlite3 directly (stores/sqlite_hot.py): count
    every statement SQLite runs, BEGIN and COMMIT included, but the PRAGMAs that set
    up a connection or a wait for the write lock. A BEGIN IMMEDIATE retried while
    another process held the write lock counts once per attempt: under load there
    are more BEGINs (and "transactions") than COMMITs and ROLLBACKs."""
    import sqlite3

    if isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.set_trace_callback(_count_sqlite)


def _count_sqlite(statement: str) -> None:
    if COUNTING.is_set() and not statement.lstrip().upper().startswith("PRAGMA"):
        _count_statement(statement)


def _count_statement(statement: str) -> None:
    kind = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    COUNTS.add("sql")
    COUNTS.add(f"sql:{kind}")
    if kind in ("BEGIN", "COMMIT", "ROLLBACK"):  # sent as statements by the hot path
        COUNTS.add(kind.lower())


def _count_psycopg() -> None:
    """PostgreSQL's hot statements run on psycopg directly (stores/pg_hot.py), not
    through SQLAlchemy: count every statement at psycopg's cursor instead."""
    import psycopg

    for name in ("execute", "executemany"):
        original = getattr(psycopg.Cursor, name)

        def counted(
            self: Any, query: Any, *args: Any, _original: Any = original, **kwargs: Any
        ) -> Any:
            if COUNTING.is_set():
                _count_statement(query if isinstance(query, str) else str(query))
            return _original(self, query, *args, **kwargs)

        setattr(psycopg.Cursor, name, counted)


def _on_begin(conn: Any) -> None:
    if conn.dialect.name != "sqlite":  # SQLite's BEGIN is counted as a statement
        COUNTS.add("begin")


def _on_commit(conn: Any) -> None:
    if conn.dialect.name != "sqlite":
        COUNTS.add("commit")


def _on_rollback(conn: Any) -> None:
    if conn.dialect.name != "sqlite":
        COUNTS.add("rollback")


@before_task_publish.connect
def _on_publish(sender: str | None = None, **_: Any) -> None:
    if COUNT:
        COUNTS.add("publish")
        COUNTS.add(f"publish:{sender}")


def _on_saga_finished(sender: Any = None, saga_id: str = "", name: str = "", **_: Any) -> None:
    # Sent right after the store's transact returned (runtime.py): the commit's end.
    if name == G1_SAGA:
        COUNTS.stamp(saga_id, time.monotonic())


@task_postrun.connect
def _on_task_done(sender: Any = None, **_: Any) -> None:
    if COUNT:
        COUNTS.add("tasks")


FLUSH_FOR = 24 * 3600.0  # seconds: longer than any benchmark run


def _flush_forever(interval: float = 0.5) -> None:
    import redis

    client = redis.Redis.from_url(COUNTER_URL, socket_timeout=5, socket_connect_timeout=5)
    for _ in range(int(FLUSH_FOR / interval)):
        time.sleep(interval)
        try:
            if client.strlen(COUNTING_KEY):
                COUNTING.set()
            else:
                COUNTING.clear()
        except Exception:  # the switch stays as it was until the next pass
            pass
        pending = COUNTS.take()
        finished = COUNTS.take_stamps()
        if not pending and not finished:
            continue
        key = f"bench:counts:{FLAVOR}:{_role['name']}"
        try:
            pipe = client.pipeline(transaction=False)
            for field, n in pending.items():
                pipe.hincrby(key, field, n)
            if finished:
                pipe.hset(FINISHED_KEY, mapping=finished)
            pipe.execute()
        except Exception:  # a lost flush only loses counts and stamps: put them back
            for field, n in pending.items():
                COUNTS._pending[field] += n
            COUNTS.stamps.update(finished)


def _start_flusher() -> None:
    threading.Thread(target=_flush_forever, name="bench-counts", daemon=True).start()


# What to instrument: only libraries the process loads anyway, so that counting does
# not weigh on a worker's memory (MEM): the plain worker must not even import
# SQLAlchemy, nor a sagaline worker on the Redis store; psycopg only for PostgreSQL.
# The caller (driver) measures every store, so it counts both.
_STORE_URL = os.environ.get("SAGALINE_STORE_URL", "") if FLAVOR == "sagaline" else ""
_COUNT_SQL = COUNT and FLAVOR != "plain" and not _STORE_URL.startswith("redis")
_COUNT_PG = _COUNT_SQL and (FLAVOR == "caller" or _STORE_URL.startswith("postgres"))

if _COUNT_SQL:
    import sqlalchemy as sa

    with contextlib.suppress(Exception):
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", _on_statement)
        sa.event.listen(sa.engine.Engine, "connect", _on_connect)
        sa.event.listen(sa.engine.Engine, "begin", _on_begin)
        sa.event.listen(sa.engine.Engine, "commit", _on_commit)
        sa.event.listen(sa.engine.Engine, "rollback", _on_rollback)
    if _COUNT_PG:
        with contextlib.suppress(ImportError):
            _count_psycopg()

if COUNT and FLAVOR == "sagaline":
    from sagaline.signals import saga_finished

    saga_finished.connect(_on_saga_finished)


@worker_init.connect
def _main_counts(**_: Any) -> None:
    if COUNT:
        _role["name"] = "main"
        _start_flusher()


@worker_process_init.connect
def _child_counts(**_: Any) -> None:
    if COUNT:
        _role["name"] = "child"
        # Counts inherited from the parent at fork belong to the parent.
        COUNTS.take()
        _start_flusher()
