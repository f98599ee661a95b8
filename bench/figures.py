"""The figures: each runs sagaline and the plain-Celery baseline alternately and returns one dict.

Every wait has a timeout and every loop a fixed count (bench/waits.py); nothing here
asserts a time. Both sides are observed by polling: sagas through `handle.get()`,
chains by reading their result keys in Redis.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import chain

from bench.waits import TaskResults, wait_sagas
from tests.harness import WorkerProcess

WAIT = 120.0  # seconds: the longest any single saga or chain may take before the run fails
BATCH_WAIT = 5 * WAIT  # seconds: the longest a batch (T1, R1, a profile round) may take

# Issue 12's targets, each a ratio against the plain-Celery chain of the same run.
TARGETS = {
    "L1": {"postgres": "ratio <= 1.6", "sqlite": "ratio <= 1.3", "redis": "ratio <= 1.25"},
    "T1": {"postgres": "ratio >= 0.6", "sqlite": "ratio >= 0.7", "redis": "ratio >= 0.75"},
    "L2": "(none)",
    "S1": "growth 4->max <= 1.2",
    "H1": "<= 1.1x of empty store",
    "R1": "(counts)",
    "MEM": "worker RSS ratio <= 1.3",
    "G1": "median <= 1 ms, <= 2 store reads",
}


def target(figure: str, store: str) -> str:
    """The target of one figure for one store, as printed beside the figure."""
    goal = TARGETS[figure]
    return goal if isinstance(goal, str) else goal.get(store, "(none)")


@dataclass
class Sizes:
    warmup: int
    l1_runs: int
    l2_runs: int
    t1_sagas: int
    t1_rounds: int
    s1_lengths: tuple[int, ...]
    s1_step_budget: int  # runs per length = max(3, budget // length)
    history: int
    redis_history: int  # the Redis store keeps it all in memory: ~5.5 KB per finished saga
    list_runs: int
    r1_sagas: int
    g1_sagas: int
    vol_events: int = 10_000_000  # VOL's database (PostgreSQL only)

    @classmethod
    def full(cls, history: int, redis_history: int) -> Sizes:
        return cls(
            warmup=10,
            l1_runs=60,
            l2_runs=30,
            t1_sagas=1000,
            t1_rounds=3,
            s1_lengths=(4, 16, 64),
            s1_step_budget=320,
            history=history,
            redis_history=redis_history,
            list_runs=30,
            r1_sagas=50,
            g1_sagas=200,
        )

    @classmethod
    def quick(cls, history: int, redis_history: int) -> Sizes:
        return cls(
            warmup=2,
            l1_runs=5,
            l2_runs=3,
            t1_sagas=20,
            t1_rounds=1,
            s1_lengths=(4, 8),
            s1_step_budget=24,
            history=history,
            redis_history=redis_history,
            list_runs=5,
            r1_sagas=5,
            g1_sagas=10,
            vol_events=14_000,
        )


@dataclass
class Bench:
    """What the figures of one store need: the app module, workers, Redis, the runtime."""

    mod: Any  # bench.app
    store: str
    store_url: str
    runtime: Any
    saga_worker: WorkerProcess
    plain_worker: WorkerProcess
    redis: Any  # counters and commandstats
    results: TaskResults  # the baseline's results, read by polling
    sizes: Sizes
    log: Callable[[str], None]
    notes: dict[str, Any] = field(default_factory=dict)


# -- one execution of each kind ---------------------------------------------------------------


def run_saga(b: Bench, name: str) -> tuple[float, Any]:
    """Seconds from run() until handle.get() observed the terminal state; and the handle."""
    saga = b.mod.SAGAS[name]
    t0 = time.perf_counter()
    handle = saga.run()
    wait_sagas([handle], timeout=WAIT, what=f"[{b.store}] saga {name}", compensated_ok=True)
    return time.perf_counter() - t0, handle


def noop_chain(b: Bench, n: int) -> Any:
    return chain(*[b.mod.plain_noop.s() for _ in range(n)])


def run_chain(b: Bench, n: int) -> float:
    c = noop_chain(b, n)
    t0 = time.perf_counter()
    last = c.apply_async()
    b.results.wait([last.id], timeout=WAIT, what=f"[{b.store}] baseline chain of {n}")
    return time.perf_counter() - t0


def failing_chain_with_errback(b: Bench) -> tuple[Any, Any, str]:
    """3 no-ops and a failing 4th task; link_error: a chain of 3 undo tasks.

    The errback chain is started by the worker whose 4th task failed; its last
    task has a known id, so the caller observes "rolled back" by polling that
    task's result key, like `handle.get()` polls the saga.
    """
    m = b.mod
    final_id = str(uuid.uuid4())
    # Immutable: Celery calls a chain errback with (request, exc, traceback) as arguments.
    undo = chain(m.plain_undo.si(), m.plain_undo.si(), m.plain_undo.si().set(task_id=final_id))
    work = chain(m.plain_noop.s(), m.plain_noop.s(), m.plain_noop.s(), m.plain_fail.s())
    return work, undo, final_id


def run_failing_chain(b: Bench) -> float:
    work, undo, final_id = failing_chain_with_errback(b)
    t0 = time.perf_counter()
    work.apply_async(link_error=undo)
    b.results.wait([final_id], timeout=WAIT, what=f"[{b.store}] baseline failing chain's undo")
    return time.perf_counter() - t0


def alternate(n: int, first: Callable[[], Any], second: Callable[[], Any]) -> None:
    """Run both n times, swapping which goes first every iteration (ABBA...)."""
    for i in range(n):
        if i % 2 == 0:
            first()
            second()
        else:
            second()
            first()


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of sorted samples."""
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]


def ms_stats(samples: list[float]) -> dict[str, float]:
    xs = sorted(samples)
    return {
        "median_ms": round(statistics.median(xs) * 1000, 3),
        "p95_ms": round(percentile(xs, 0.95) * 1000, 3),
        "min_ms": round(xs[0] * 1000, 3),
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# -- L1 -----------------------------------------------------------------------------------


def figure_l1(b: Bench, *, label: str = "L1") -> dict[str, Any]:
    sz = b.sizes
    saga_s: list[float] = []
    store_s: list[float] = []
    chain_s: list[float] = []

    def saga_once(record: bool) -> None:
        elapsed, handle = run_saga(b, "noop4")
        if record:
            saga_s.append(elapsed)
            rec = handle.record()
            store_s.append((rec.finished_at or rec.updated_at) - rec.created_at)

    def chain_once(record: bool) -> None:
        elapsed = run_chain(b, 4)
        if record:
            chain_s.append(elapsed)

    alternate(sz.warmup, lambda: saga_once(False), lambda: chain_once(False))
    alternate(sz.l1_runs, lambda: saga_once(True), lambda: chain_once(True))
    s, c, st = ms_stats(saga_s), ms_stats(chain_s), ms_stats(store_s)
    return {
        "figure": label,
        "store": b.store,
        "runs": sz.l1_runs,
        "steps": 4,
        "sagaline_median_ms": s["median_ms"],
        "sagaline_p95_ms": s["p95_ms"],
        "baseline_median_ms": c["median_ms"],
        "baseline_p95_ms": c["p95_ms"],
        "ratio_median": ratio(s["median_ms"], c["median_ms"]),
        "ratio_p95": ratio(s["p95_ms"], c["p95_ms"]),
        # created_at -> finished_at as the store recorded them: without the caller's polling.
        "sagaline_in_store_median_ms": st["median_ms"],
        "target": target("L1", b.store),
    }


# -- L2 -----------------------------------------------------------------------------------


def figure_l2(b: Bench) -> dict[str, Any]:
    sz = b.sizes
    saga_s: list[float] = []
    chain_s: list[float] = []

    def saga_once(record: bool) -> None:
        elapsed, handle = run_saga(b, "fail4")
        status = handle.status.value
        if status != "COMPENSATED":
            raise RuntimeError(f"L2 saga ended {status}, expected COMPENSATED")
        if record:
            saga_s.append(elapsed)

    def chain_once(record: bool) -> None:
        elapsed = run_failing_chain(b)
        if record:
            chain_s.append(elapsed)

    alternate(max(1, sz.warmup // 2), lambda: saga_once(False), lambda: chain_once(False))
    alternate(sz.l2_runs, lambda: saga_once(True), lambda: chain_once(True))
    s, c = ms_stats(saga_s), ms_stats(chain_s)
    return {
        "figure": "L2",
        "store": b.store,
        "runs": sz.l2_runs,
        "sagaline_median_ms": s["median_ms"],
        "sagaline_p95_ms": s["p95_ms"],
        "baseline_median_ms": c["median_ms"],
        "baseline_p95_ms": c["p95_ms"],
        "ratio_median": ratio(s["median_ms"], c["median_ms"]),
        "ratio_p95": ratio(s["p95_ms"], c["p95_ms"]),
        "sagaline_is": "run() -> s1,s2,s3 ok, s4 raises -> compensate s3,s2,s1 (in order) -> "
        "COMPENSATED observed by handle.get()",
        "baseline_is": "chain(noop,noop,noop,fail).apply_async(link_error=chain(undo,undo,undo))"
        "; timed until the last undo's result is in the Redis backend. Plain "
        "Celery has no per-step rollback state: the errback runs whatever "
        "happened, with no record of which steps had applied",
        "target": target("L2", b.store),
    }


# -- T1 -----------------------------------------------------------------------------------


def throughput_sagas(b: Bench, n: int, label: str = "T1") -> dict[str, float]:
    saga = b.mod.SAGAS["noop4"]
    t0 = time.perf_counter()
    handles = [saga.run() for _ in range(n)]
    submitted = time.perf_counter() - t0
    wait_sagas(handles, timeout=BATCH_WAIT, what=f"[{b.store}] {label}")
    total = time.perf_counter() - t0
    return {"seconds": total, "submit_seconds": submitted}


def throughput_chains(b: Bench, n: int, label: str = "T1") -> dict[str, float]:
    # A fresh signature per chain: apply_async freezes ids and links into the signature,
    # so re-sending one chain object re-sends (and re-links) the same tasks.
    chains = [noop_chain(b, 4) for _ in range(n)]
    t0 = time.perf_counter()
    results = [c.apply_async() for c in chains]
    submitted = time.perf_counter() - t0
    b.results.wait(
        [r.id for r in results], timeout=BATCH_WAIT, what=f"[{b.store}] {label} baseline"
    )
    total = time.perf_counter() - t0
    return {"seconds": total, "submit_seconds": submitted}


def figure_t1(b: Bench, *, label: str = "T1", rounds: int | None = None) -> dict[str, Any]:
    sz = b.sizes
    n = sz.t1_sagas
    saga_runs: list[dict[str, float]] = []
    chain_runs: list[dict[str, float]] = []
    alternate(
        rounds or sz.t1_rounds,
        lambda: saga_runs.append(throughput_sagas(b, n, label)),
        lambda: chain_runs.append(throughput_chains(b, n, label)),
    )
    s = statistics.median(r["seconds"] for r in saga_runs)
    c = statistics.median(r["seconds"] for r in chain_runs)
    return {
        "figure": label,
        "store": b.store,
        "sagas": n,
        "steps": 4,
        "rounds": len(saga_runs),
        "sagaline_seconds": round(s, 3),
        "sagaline_per_s": round(n / s, 1),
        "baseline_seconds": round(c, 3),
        "baseline_per_s": round(n / c, 1),
        "ratio_throughput": ratio(n / s, n / c),
        "sagaline_submit_seconds": round(
            statistics.median(r["submit_seconds"] for r in saga_runs), 3
        ),
        "baseline_submit_seconds": round(
            statistics.median(r["submit_seconds"] for r in chain_runs), 3
        ),
        "sagaline_rounds_s": [round(r["seconds"], 3) for r in saga_runs],
        "baseline_rounds_s": [round(r["seconds"], 3) for r in chain_runs],
        "target": target("T1", b.store),
    }


# -- S1 -----------------------------------------------------------------------------------


def figure_s1(b: Bench) -> dict[str, Any]:
    sz = b.sizes
    lengths: dict[str, dict[str, float]] = {}
    for n in sz.s1_lengths:
        runs = max(3, sz.s1_step_budget // n)
        saga_s: list[float] = []
        chain_s: list[float] = []
        alternate(1, lambda n=n: run_saga(b, f"noop{n}"), lambda n=n: run_chain(b, n))
        alternate(
            runs,
            lambda n=n, out=saga_s: out.append(run_saga(b, f"noop{n}")[0]),
            lambda n=n, out=chain_s: out.append(run_chain(b, n)),
        )
        sm, cm = statistics.median(saga_s), statistics.median(chain_s)
        lengths[str(n)] = {
            "runs": runs,
            "sagaline_ms_per_step": round(sm * 1000 / n, 3),
            "baseline_ms_per_step": round(cm * 1000 / n, 3),
            "ratio": ratio(sm, cm),
        }
    lo, hi = str(sz.s1_lengths[0]), str(sz.s1_lengths[-1])
    return {
        "figure": "S1",
        "store": b.store,
        "lengths": lengths,
        "sagaline_growth": ratio(
            lengths[hi]["sagaline_ms_per_step"], lengths[lo]["sagaline_ms_per_step"]
        ),
        "baseline_growth": ratio(
            lengths[hi]["baseline_ms_per_step"], lengths[lo]["baseline_ms_per_step"]
        ),
        "ratio_at_max": lengths[hi]["ratio"],
        "target": target("S1", b.store),
    }


# -- H1 -----------------------------------------------------------------------------------


def list_latency(b: Bench, runs: int) -> dict[str, float]:
    import sagaline
    from sagaline import SagaStatus

    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rows = sagaline.list_sagas(status=SagaStatus.COMPENSATED, limit=50, runtime=b.runtime)
        samples.append(time.perf_counter() - t0)
        if not rows:
            raise RuntimeError("list_sagas(COMPENSATED) returned nothing")
    return ms_stats(samples)


def figure_h1(
    b: Bench, empty_l1: dict[str, Any], empty_t1: dict[str, Any], empty_list: dict[str, float]
) -> dict[str, Any]:
    from bench.history import load_history

    sz = b.sizes
    history = sz.redis_history if b.store == "redis" else sz.history
    b.log(f"[{b.store}] H1: loading {history:,} finished sagas")
    loaded = load_history(b.store_url, history)
    b.log(
        f"[{b.store}] H1: loaded in {loaded['load_seconds']:.1f}s "
        f"(+{loaded['vacuum_seconds']:.1f}s vacuum/analyze)"
    )
    listing = list_latency(b, sz.list_runs)
    l1 = figure_l1(b, label="H1.L1")
    t1 = figure_t1(b, label="H1.T1", rounds=1)
    listing_after = list_latency(b, sz.list_runs)
    return {
        "figure": "H1",
        "store": b.store,
        "history": history,
        "load_seconds": round(loaded["load_seconds"], 2),
        "vacuum_seconds": round(loaded["vacuum_seconds"], 2),
        **(
            {"history_memory_mb": round(loaded["memory_bytes"] / 2**20, 1)}
            if "memory_bytes" in loaded
            else {}
        ),
        "l1_sagaline_median_ms": l1["sagaline_median_ms"],
        "l1_sagaline_p95_ms": l1["sagaline_p95_ms"],
        "l1_empty_median_ms": empty_l1["sagaline_median_ms"],
        "l1_vs_empty": ratio(l1["sagaline_median_ms"], empty_l1["sagaline_median_ms"]),
        "l1_ratio_to_baseline": l1["ratio_median"],
        "t1_sagaline_per_s": t1["sagaline_per_s"],
        "t1_empty_per_s": empty_t1["sagaline_per_s"],
        "t1_vs_empty": ratio(t1["sagaline_per_s"], empty_t1["sagaline_per_s"]),
        "t1_ratio_to_baseline": t1["ratio_throughput"],
        "baseline_l1_drift": ratio(l1["baseline_median_ms"], empty_l1["baseline_median_ms"]),
        "list_compensated_50_median_ms": listing["median_ms"],
        "list_compensated_50_p95_ms": listing["p95_ms"],
        "list_compensated_50_after_t1_median_ms": listing_after["median_ms"],
        "list_empty_store_median_ms": empty_list["median_ms"],
        "target": target("H1", b.store),
    }


# -- R1 -----------------------------------------------------------------------------------


def _worker_counts(b: Bench, flavor: str) -> dict[str, dict[str, int]]:
    out = {}
    for role in ("main", "child"):
        raw = b.redis.hgetall(f"bench:counts:{flavor}:{role}")
        out[role] = {k.decode(): int(v) for k, v in raw.items()}
    return out


def _redis_commands(b: Bench) -> dict[str, int]:
    stats = b.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(set(after) | set(before))
        if after.get(k, 0) - before.get(k, 0)
    }


FLUSH_WAIT = 1.3  # > the workers' 0.5 s flush interval, with margin


def _measure(b: Bench, flavor: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    b.mod.set_counting(b.redis, True)  # the workers see it within their flush interval
    try:
        return _measure_counted(b, flavor, work)
    finally:
        b.mod.set_counting(b.redis, False)


def _measure_counted(b: Bench, flavor: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    time.sleep(FLUSH_WAIT)
    caller0 = b.mod.COUNTS.snapshot()
    workers0 = _worker_counts(b, flavor)
    redis0 = _redis_commands(b)
    t0 = time.monotonic()
    phases = work()
    window = time.monotonic() - t0
    redis1 = _redis_commands(b)
    time.sleep(FLUSH_WAIT)
    workers1 = _worker_counts(b, flavor)
    ignored = {"hincrby", "info", "hgetall", "ping", "strlen"}  # the counting itself
    rc = {k: v for k, v in _diff(redis1, redis0).items() if k not in ignored}
    return {
        "window_s": window,
        "caller": _diff(b.mod.COUNTS.snapshot(), caller0),
        "child": _diff(workers1["child"], workers0["child"]),
        "main": _diff(workers1["main"], workers0["main"]),
        "redis": rc,
        **phases,
    }


def figure_r1(b: Bench) -> dict[str, Any]:
    """Counted, not estimated: SQL statements and messages per step, in every process."""
    k = b.sizes.r1_sagas
    steps = 4 * k
    saga = b.mod.SAGAS["noop4"]

    def sagas() -> dict[str, Any]:
        c0 = b.mod.COUNTS.snapshot()
        handles = [saga.run() for _ in range(k)]
        c1 = b.mod.COUNTS.snapshot()
        wait_sagas(handles, timeout=BATCH_WAIT, what=f"[{b.store}] R1")
        c2 = b.mod.COUNTS.snapshot()
        return {"caller_run": _diff(c1, c0), "caller_get": _diff(c2, c1)}

    def chains() -> dict[str, Any]:
        results = [noop_chain(b, 4).apply_async() for _ in range(k)]
        b.results.wait([r.id for r in results], timeout=BATCH_WAIT, what=f"[{b.store}] R1 baseline")
        return {}

    s = _measure(b, "sagaline", sagas)
    p = _measure(b, "plain", chains)

    def per(d: dict[str, int], key: str, n: int = steps) -> float:
        return round(d.get(key, 0) / n, 3)

    child = s["child"]
    return {
        "figure": "R1",
        "store": b.store,
        "sagas": k,
        "steps": steps,
        # inside the pool processes, per executed step (claim + body + complete + publish)
        "sql_statements_per_step": per(child, "sql"),
        "sql_by_kind_per_step": {
            key.split(":", 1)[1]: per(child, key) for key in child if key.startswith("sql:")
        },
        "transactions_per_step": per(child, "begin"),
        "commits_per_step": per(child, "commit"),
        "rollbacks_per_step": per(child, "rollback"),
        "sagaline_tasks_per_step": per(child, "tasks"),
        "sagaline_messages_per_step": round(
            (child.get("publish", 0) + s["caller"].get("publish", 0)) / steps, 3
        ),
        "baseline_messages_per_step": round(
            (p["child"].get("publish", 0) + p["caller"].get("publish", 0)) / steps, 3
        ),
        "baseline_tasks_per_step": per(p["child"], "tasks"),
        # caller side
        "caller_sql_per_run": per(s["caller_run"], "sql", k),
        "caller_transactions_per_run": per(s["caller_run"], "begin", k),
        "caller_sql_per_get": per(s["caller_get"], "sql", k),
        # the worker's main process (sweeper) during the window
        "sweeper_sql_per_s": round(s["main"].get("sql", 0) / max(s["window_s"], 1e-9), 2),
        # every command the Redis server received (broker + result backend), per step
        "sagaline_redis_commands_per_step": round(sum(s["redis"].values()) / steps, 2),
        "baseline_redis_commands_per_step": round(sum(p["redis"].values()) / steps, 2),
        "sagaline_redis_by_command": s["redis"],
        "baseline_redis_by_command": p["redis"],
        "target": target("R1", b.store),
    }


# -- MEM ----------------------------------------------------------------------------------


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def worker_memory(w: WorkerProcess) -> dict[str, Any]:
    main = vm_hwm_kb(w.pid)
    children = [vm_hwm_kb(p) for p in w.child_pids()]
    return {
        "main_kb": main,
        "children_kb": children,
        "max_child_kb": max(children or [0]),
        "total_kb": main + sum(children),
    }


def figure_mem(b: Bench) -> dict[str, Any]:
    s = worker_memory(b.saga_worker)
    p = worker_memory(b.plain_worker)
    return {
        "figure": "MEM",
        "store": b.store,
        "measure": "VmHWM (peak RSS) after the figures",
        "sagaline_main_kb": s["main_kb"],
        "sagaline_max_child_kb": s["max_child_kb"],
        "sagaline_total_kb": s["total_kb"],
        "baseline_main_kb": p["main_kb"],
        "baseline_max_child_kb": p["max_child_kb"],
        "baseline_total_kb": p["total_kb"],
        "ratio_total": ratio(s["total_kb"], p["total_kb"]),
        "ratio_child": ratio(s["max_child_kb"], p["max_child_kb"]),
        "target": target("MEM", b.store),
    }
