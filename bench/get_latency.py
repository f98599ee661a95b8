"""G1: how soon `handle.get()` returns after the commit that ends its saga, in how many reads.

The commit is a worker's own: the bench's sagaline worker completes the second
and last step of a no-op saga (`bench.g1`) in its pool process, and stamps the
time once the store's `transact` has returned (bench/app.py, on `saga_finished`,
sent right after the commit). The caller calls `handle.get()` right after
`run()`, so it is already waiting, its first read done, while the worker runs the
first step; a saga found ended by that first read did not wait and is counted
apart, not timed. Both processes read CLOCK_MONOTONIC (`time.monotonic()`), one
clock for the whole machine: each sample is the caller's reading once `get()`
returned minus the worker's once the commit returned. The worker's stamps reach
the caller through Redis after the sagas, with the counts (every 0.5 s), so
handing them over costs the measured path nothing. A sample may be negative:
PostgreSQL and Redis deliver the notification at the commit, before the
committing call has returned in the worker.

The store reads are the caller's calls of `get_saga`, `get_steps` and
`read_state` during each `get()` (tests/stores.py's `counted_reads`). On a
SQLite file `get()` also peeks at the file from a connection of its own
(stores/sqlite_watch.py); the peeks are not store reads and are not counted,
but their CPU time is in the caller's CPU time per `get()` (every thread of the
caller's process while it was in `get()`: the listener thread's too).
"""

from __future__ import annotations

import time
from typing import Any

from bench.figures import WAIT, Bench, percentile, target
from bench.waits import BenchRunFailed, BenchTimeout, poll_pauses, wait_sagas
from sagaline.states import SAGA_TERMINAL
from tests.stores import counted_reads


def figure_g1(b: Bench) -> dict[str, Any]:
    sz = b.sizes
    saga = b.mod.SAGAS["g1"]
    returned: dict[str, float] = {}  # saga id -> time.monotonic() once get() returned
    waited: list[str] = []
    reads: list[int] = []
    cpu = 0.0  # the caller's, all its threads, while in get()
    with counted_reads(b.runtime.store) as seen:
        for i in range(sz.warmup + sz.g1_sagas):
            handle = saga.run()
            first = len(seen)
            cpu0 = time.process_time()
            wait_sagas([handle], timeout=WAIT, what=f"[{b.store}] G1 saga")
            returned[handle.saga_id] = time.monotonic()
            if i >= sz.warmup:
                cpu += time.process_time() - cpu0
                reads.append(len(seen) - first)
                if seen[first].status not in SAGA_TERMINAL:
                    waited.append(handle.saga_id)
    committed = worker_stamps(b, list(returned))  # every saga's, so that none is left behind
    xs = sorted(returned[sid] - committed[sid] for sid in waited)
    if not xs:
        raise BenchRunFailed(f"[{b.store}] G1: every saga had ended before get() first read it")
    return {
        "figure": "G1",
        "store": b.store,
        "sagas": sz.g1_sagas,
        "steps": 2,
        "waited": len(xs),
        "median_ms": round(percentile(xs, 0.5) * 1000, 3),
        "p90_ms": round(percentile(xs, 0.9) * 1000, 3),
        "p99_ms": round(percentile(xs, 0.99) * 1000, 3),
        "max_ms": round(xs[-1] * 1000, 3),
        "reads_per_get_max": max(reads),
        "reads_per_get_mean": round(sum(reads) / len(reads), 3),
        "caller_cpu_per_get_ms": round(cpu * 1000 / len(reads), 3),
        # ...and these were not timed: their first read found them ended
        "ended_before_first_read": sz.g1_sagas - len(xs),
        "measured_is": "a worker's commit of the saga's end returned -> the caller's "
        "handle.get(), waiting since before it, returned",
        "target": target("G1", b.store),
    }


def worker_stamps(b: Bench, saga_ids: list[str]) -> dict[str, float]:
    """When the commit that ended each saga returned, as its worker stamped it."""
    key = b.mod.FINISHED_KEY
    found: dict[str, float] = {}
    missing = saga_ids
    for pause in poll_pauses(WAIT, first=0.1, fast=0.1):
        for sid, value in zip(missing, b.redis.hmget(key, missing), strict=True):
            if value is not None:
                found[sid] = float(value)
        missing = [s for s in missing if s not in found]
        if not missing:
            b.redis.hdel(key, *saga_ids)
            return found
        time.sleep(pause)
    raise BenchTimeout(
        f"[{b.store}] G1: no end stamped by the worker for {len(missing)} of "
        f"{len(saga_ids)} sagas after {WAIT:g}s (first: {missing[0]})"
    )
