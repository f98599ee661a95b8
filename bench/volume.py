"""VOL: PostgreSQL with 10,000,000 events in monthly partitions.

The events live in a database of their own (VOL_DATABASE_<events>), generated once with
INSERT ... SELECT over generate_series (not through the engine) and reused by the
next runs while its marker (a comment on the database: the event count, the schema
revision, the first saga's time) still matches. The history has the shape of H1's
(bench/history.py: 14 events and 4 steps per saga, 1% FAILED), spread over the
VOL_MONTHS months before the current one.

The figure prints:
- how long generating took (0 when reused);
- the time to drop one month: a month of the same density is added before the
  history, its saga and step rows deleted (what the gc's batches do, timed apart),
  then `drop_expired_partitions` drops it, with its events (target < 1 s);
- L1 and T1 on a worker of this store beside a worker of the run's empty store,
  their sagas alternating (ABBA) so that both sides share the machine's load
  (target: within 1.05x);
- listing the newest 50 FAILED sagas (target < 10 ms), which the
  (status, created_at) index serves.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

from bench.figures import Bench, alternate, ms_stats, ratio, run_saga, throughput_sagas
from bench.history import EVENTS, HISTORY_NAME, _events_values, _status_sql

VOL_DATABASE = "sagaline_bench_vol"
VOL_MONTHS = 6
T1_SAGAS = 500  # sagas per T1 batch (at most; --t1-sagas lowers it)
T1_ROUNDS = 2  # batches per side, alternated
TARGET = "drop < 1 s; L1, T1 <= 1.05x empty; list50 < 10 ms"
_MARKER = re.compile(r"^sagaline-bench-vol events=(\d+) revision=(\S+) start=([0-9.]+)$")
# The month dropped each run: sagas whose ids start so, apart from the history's.
DOOMED_PREFIX = "dddddddd"


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _insert_sagas(conn: Any, sid: str, n: int, t0: float, dt: float) -> None:
    """`n` finished sagas created at t0 + i * dt, with their steps and events (H1's shape)."""
    ended = f"CASE WHEN {_status_sql('i')} = 'COMPLETED' THEN FALSE ELSE TRUE END"
    conn.execute(f"""
        INSERT INTO sagaline_sagas (saga_id, name, status, input, output, error, failed_step,
            idempotency_key, fingerprint, created_at, updated_at, finished_at, version)
        SELECT {sid}, '{HISTORY_NAME}', {_status_sql("i")}, json_build_object('order', i),
            CASE WHEN {ended} THEN NULL ELSE json_build_object('order', i, 'ok', true) END,
            CASE WHEN {ended} THEN 'BenchFailure: step 4 fails on purpose' END,
            CASE WHEN {ended} THEN 's4' END, NULL, 'history',
            {t0!r} + i * {dt!r}, {t0!r} + i * {dt!r} + 0.05, {t0!r} + i * {dt!r} + 0.05, 12
        FROM generate_series(1, {int(n)}) AS i""")
    conn.execute(f"""
        INSERT INTO sagaline_steps (saga_id, name, position, status, attempt, comp_status,
            comp_attempt, has_compensation_data, started_at, finished_at, version)
        SELECT {sid}, 's' || k, k - 1,
            CASE WHEN k = 4 AND {ended} THEN 'FAILED' ELSE 'SUCCEEDED' END, 1,
            CASE WHEN k < 4 AND {ended} THEN 'COMPENSATED' END,
            CASE WHEN k < 4 AND {ended} THEN 1 ELSE 0 END, FALSE,
            {t0!r} + i * {dt!r} + k * 0.01, {t0!r} + i * {dt!r} + k * 0.01 + 0.005, 3
        FROM generate_series(1, {int(n)}) AS i CROSS JOIN generate_series(1, 4) AS k""")
    conn.execute(f"""
        INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase, detail)
        SELECT {sid}, {t0!r} + i * {dt!r} + e.n * 0.001, e.kind, e.step, e.attempt, e.phase,
            NULL
        FROM generate_series(1, {int(n)}) AS i
        CROSS JOIN (VALUES {_events_values()}) AS e(n, kind, step, attempt, phase)""")


def history_start(now: float) -> float:
    """Where the history begins: a day into the first of the VOL_MONTHS months before
    this one (the day keeps its sagas clear of the dropped month's end: SKEW_MARGIN)."""
    from sagaline.stores.pg_partitions import add_months, month_start

    return add_months(month_start(now), -VOL_MONTHS).timestamp() + 86400.0


def _marker(url: str) -> tuple[int, str, float] | None:
    import psycopg

    server = _dsn(url).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(server, autocommit=True) as conn:
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (_dbname(url),),
        ).fetchone()
    m = _MARKER.match((row[0] or "") if row else "")
    return None if m is None else (int(m.group(1)), m.group(2), float(m.group(3)))


def ensure_volume(url: str, events: int, log: Any = print) -> dict[str, Any]:
    """The database at `url` holding `events` events (rounded to whole sagas), made if
    missing or not as asked; how long that took and where its history starts."""
    import psycopg

    from sagaline.stores.pg_partitions import ensure_partitions
    from sagaline.stores.schema import SCHEMA_REVISION
    from sagaline.stores.sql import SQLStore
    from tests.harness import drop_database, shared_postgres_url

    found = _marker(url)
    if found is not None and found[:2] == (events, SCHEMA_REVISION):
        log(f"VOL: reusing database {_dbname(url)} ({events:,} events)")
        return {"generation_seconds": 0.0, "reused": True, "start": found[2]}
    log(f"VOL: generating {events:,} events in database {_dbname(url)}")
    started = time.monotonic()
    drop_database(url)
    if shared_postgres_url(_dbname(url)) != url:
        raise ValueError(f"unexpected URL for the shared PostgreSQL database {url}")
    now = time.time()
    start = history_start(now)
    store = SQLStore(url)
    try:
        store.migrate()
        with store.engine.begin() as conn:  # the history's months
            for k in range(VOL_MONTHS):
                ensure_partitions(conn, start + k * 31 * 86400.0, ahead=0)
    finally:
        store.close()
    n = max(1, events // len(EVENTS))
    dt = (now - 86400.0 - start) / n
    sid = "lpad(to_hex(i), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i), 12, '0')"
    with psycopg.connect(_dsn(url), autocommit=False) as conn:
        conn.execute("SET synchronous_commit = off")
        _insert_sagas(conn, sid, n, start, dt)
        conn.commit()
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        for table in ("sagaline_sagas", "sagaline_steps", "sagaline_events"):
            conn.execute(f"VACUUM (ANALYZE) {table}")
        marker = f"sagaline-bench-vol events={events} revision={SCHEMA_REVISION} start={start!r}"
        conn.execute(f"COMMENT ON DATABASE {_dbname(url)} IS '{marker}'")
    seconds = time.monotonic() - started
    log(f"VOL: generated {n * len(EVENTS):,} events in {seconds:.1f}s")
    return {"generation_seconds": round(seconds, 2), "reused": False, "start": start}


def drop_one_month(url: str, start: float, events: int) -> dict[str, Any]:
    """Add a month of history before `start` (as dense as the rest), delete its sagas'
    rows, and time `drop_expired_partitions` dropping it with its events."""
    import psycopg

    from sagaline.stores.pg_partitions import (
        add_months,
        drop_expired_partitions,
        ensure_partitions,
        month_start,
    )
    from sagaline.stores.sql import SQLStore

    month = add_months(month_start(start), -1)
    lower, upper = month.timestamp(), add_months(month, 1).timestamp()
    store = SQLStore(url)
    try:
        with store.engine.begin() as conn:  # what an interrupted run may have left
            _delete_sagas_before(conn, upper)
            drop_expired_partitions(conn, upper)
            ensure_partitions(conn, lower, ahead=0)
        n = max(1, events // len(EVENTS) // VOL_MONTHS)
        sid = f"'{DOOMED_PREFIX}-0000-4000-8000-' || lpad(to_hex(i), 12, '0')"
        with psycopg.connect(_dsn(url), autocommit=False) as conn:
            conn.execute("SET synchronous_commit = off")
            _insert_sagas(conn, sid, n, lower + 3600.0, (upper - lower - 7200.0) / n)
            conn.commit()
        t0 = time.perf_counter()
        with store.engine.begin() as conn:
            _delete_sagas_before(conn, upper)
        rows_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with store.engine.begin() as conn:
            dropped = drop_expired_partitions(conn, upper)
        drop_seconds = time.perf_counter() - t0
    finally:
        store.close()
    if [p.lower for p in dropped] != [lower]:
        raise RuntimeError(f"VOL: expected to drop the month at {lower}, dropped {dropped}")
    return {
        "dropped_partition": dropped[0].name,
        "dropped_events": n * len(EVENTS),
        "drop_month_seconds": round(drop_seconds, 4),
        "saga_rows_delete_seconds": round(rows_seconds, 3),
    }


def _delete_sagas_before(conn: Any, t: float) -> None:
    import sqlalchemy as sa

    old = "SELECT saga_id FROM sagaline_sagas WHERE created_at < :t"
    conn.execute(sa.text(f"DELETE FROM sagaline_steps WHERE saga_id IN ({old})"), {"t": t})
    conn.execute(sa.text("DELETE FROM sagaline_sagas WHERE created_at < :t"), {"t": t})


def list_failed_latency(runtime: Any, runs: int) -> dict[str, float]:
    """`sagaline.list_sagas(status=FAILED, limit=50)`, timed from the caller."""
    import sagaline
    from sagaline import SagaStatus

    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rows = sagaline.list_sagas(status=SagaStatus.FAILED, limit=50, runtime=runtime)
        samples.append(time.perf_counter() - t0)
        if not rows:
            raise RuntimeError("VOL: list_sagas(FAILED, limit=50) returned nothing")
    return ms_stats(samples)


class Sides:
    """The empty store's runtime and queue, and the big one's: the caller switches
    between them, so that their runs alternate (ABBA) under the same machine load."""

    def __init__(self, b: Bench, vol_runtime: Any, vol_queue: str) -> None:
        self.b = b
        self.by_side = {"empty": (b.runtime, b.mod.ROUTE["saga"]), "vol": (vol_runtime, vol_queue)}

    def use(self, side: str) -> None:
        from sagaline._state import set_default_runtime

        runtime, queue = self.by_side[side]
        self.b.mod.app._sagaline_runtime = runtime
        set_default_runtime(runtime)
        self.b.mod.ROUTE["saga"] = queue

    def l1(self) -> dict[str, dict[str, float]]:
        """One 4-step saga at a time, alternating sides; median and p95 per side."""
        samples: dict[str, list[float]] = {"empty": [], "vol": []}

        def once(side: str, record: bool) -> None:
            self.use(side)
            elapsed, _ = run_saga(self.b, "noop4")
            if record:
                samples[side].append(elapsed)

        sz = self.b.sizes
        alternate(sz.warmup, lambda: once("empty", False), lambda: once("vol", False))
        alternate(sz.l1_runs, lambda: once("empty", True), lambda: once("vol", True))
        return {side: ms_stats(xs) for side, xs in samples.items()}

    def t1(self, n: int, rounds: int) -> dict[str, float]:
        """Batches of `n` sagas at once, alternating sides; median sagas/s per side."""
        per_s: dict[str, list[float]] = {"empty": [], "vol": []}

        def batch(side: str) -> None:
            self.use(side)
            per_s[side].append(n / throughput_sagas(self.b, n, f"VOL.T1 {side}")["seconds"])

        alternate(rounds, lambda: batch("empty"), lambda: batch("vol"))
        return {side: statistics.median(xs) for side, xs in per_s.items()}


def figure_vol(b: Bench, start_worker: Any) -> dict[str, Any]:
    """VOL on PostgreSQL; `start_worker(store_url, queue)` starts a sagaline worker."""
    import sagaline
    from tests.harness import SHARED_PG_HOST, SHARED_PG_PORT, SHARED_PG_USER

    events = b.sizes.vol_events
    url = f"postgresql+psycopg://{SHARED_PG_USER}@{SHARED_PG_HOST}:{SHARED_PG_PORT}/"
    url += f"{VOL_DATABASE}_{events}"  # one per size: a small run keeps the big one
    made = ensure_volume(url, events, b.log)
    queue = "bench.saga.vol"
    worker = start_worker(url, queue)
    empty_runtime, empty_route = b.runtime, b.mod.ROUTE["saga"]
    vol_runtime = sagaline.init_app(b.mod.app, store=url, sweeper=False)
    sides = Sides(b, vol_runtime, queue)
    t1_sagas = min(b.sizes.t1_sagas, T1_SAGAS)
    try:
        sides.use("vol")
        listing = list_failed_latency(vol_runtime, b.sizes.list_runs)
        b.log("[postgres] VOL: L1, alternating the empty store and this one")
        l1 = sides.l1()
        b.log(f"[postgres] VOL: T1 ({T1_ROUNDS} batches of {t1_sagas} per side, alternating)")
        t1 = sides.t1(t1_sagas, T1_ROUNDS)
        b.log("[postgres] VOL: dropping one month")
        drop = drop_one_month(url, made["start"], events)
    finally:
        sides.use("empty")
        b.mod.ROUTE["saga"] = empty_route
        b.runtime = empty_runtime
        worker.stop()
        vol_runtime.store.close()
    return {
        "figure": "VOL",
        "store": b.store,
        "events": (events // len(EVENTS)) * len(EVENTS),
        "generation_seconds": made["generation_seconds"],
        "reused": made["reused"],
        **drop,
        "l1_median_ms": l1["vol"]["median_ms"],
        "l1_p95_ms": l1["vol"]["p95_ms"],
        "l1_empty_median_ms": l1["empty"]["median_ms"],
        "l1_vs_empty": ratio(l1["vol"]["median_ms"], l1["empty"]["median_ms"]),
        "t1_sagas": t1_sagas,
        "t1_per_s": round(t1["vol"], 1),
        "t1_empty_per_s": round(t1["empty"], 1),
        # As a slowdown, like L1's: above 1 is slower than on the empty store.
        "t1_slowdown_vs_empty": ratio(t1["empty"], t1["vol"]),
        "list_failed_50_median_ms": listing["median_ms"],
        "list_failed_50_p95_ms": listing["p95_ms"],
        "target": TARGET,
    }
