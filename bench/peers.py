"""`python -m bench --peers`: the same 4-step workload on DBOS and celery-saga, beside sagaline's.

After sagaline's own figures, the benchmark measures L1 (one saga, submit →
terminal) and T1 (a batch of sagas at once) on the systems a user would choose
instead, each alternating with the plain-Celery chain in the same run, exactly as
sagaline's figures do, so that every system gets a ratio to a chain measured beside it:

- DBOS (the `dbos` package) on PostgreSQL: a fresh database on the shared server,
  dropped at the end; two executor processes (`python -m bench.peer_dbos`) run a
  workflow of 4 no-op steps from one DBOS queue, which the driver fills through a
  `DBOSClient`. DBOS dequeues by polling; the interval is `--dbos-polling-interval`.
- celery-saga on Redis: one Celery worker (`-P prefork -c 2`, like sagaline's)
  running celery-saga's tasks for a saga of the same 4 no-op steps, its state in the
  benchmark's private Redis.

Both are observed by polling (DBOS's workflow status table, celery-saga's saga
documents), on the schedule the baseline and `handle.get()` use. Every process is
started in its own process group, stopped by pid at the end of its figures and,
whatever happens, by the benchmark's cleanup (SIGTERM, Ctrl-C).

Needs the `bench-peers` extra: `pip install -e '.[bench-peers]'`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import Sizes, alternate, ms_stats, ratio, run_chain, throughput_chains
from bench.report import print_rows
from bench.waits import BenchRunFailed, BenchTimeout, TaskResults, poll_pauses
from tests.harness import (
    SHARED_PG_HOST,
    SHARED_PG_PORT,
    SHARED_PG_USER,
    WorkerProcess,
    drop_database,
    shared_postgres_url,
)

EXTRA = "bench-peers"
# module -> the distribution that provides it
PACKAGES = {"dbos": "dbos", "celery_saga": "celery-saga"}
FIGURES = ("L1", "T1")
WAIT = 120.0  # seconds one saga may take before the run fails (as for sagaline's figures)
BATCH_WAIT = 5 * WAIT
READ_BATCH = 500  # ids per status read
DBOS_POLLING_INTERVAL = 0.05  # seconds: DBOS's default is 1.0, which would make L1 ~0.5 s


def missing_peers() -> list[str]:
    """The distributions of the peers that cannot be imported here."""
    missing = []
    for module, dist in PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package or a blocked import
            found = False
        if not found:
            missing.append(dist)
    return missing


def require_peers() -> None:
    """SystemExit naming what is missing and the extra that installs it."""
    missing = missing_peers()
    if missing:
        names = " and ".join(missing)
        verb = "is" if len(missing) == 1 else "are"
        raise SystemExit(
            f"python -m bench --peers: {names} {verb} not installed. The peers come with "
            f"the {EXTRA} extra: pip install -e '.[{EXTRA}]' (DBOS and celery-saga)."
        )


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass
class ChainSide:
    """What bench.figures' chain runners need: the app module, the result reader, a label."""

    mod: Any
    results: TaskResults
    store: str


class Peer:
    """A system measured beside sagaline: started, given sagas, polled, stopped."""

    key = ""
    store = ""

    def system(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}

    def start(self) -> None:
        raise NotImplementedError

    def submit(self) -> str:
        """Start one saga; its id."""
        raise NotImplementedError

    def finished(self, ids: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        """Of `ids`: those completed, and those that ended otherwise (id -> status)."""
        raise NotImplementedError

    def batch_notes(self, ids: Sequence[str]) -> dict[str, Any]:
        """What to report about a finished batch besides its time."""
        return {}

    def stop(self) -> None:
        raise NotImplementedError


def wait_peer(peer: Peer, ids: Sequence[str], *, timeout: float, what: str) -> None:
    """Wait until every saga completed; BenchTimeout or BenchRunFailed otherwise."""
    pending = list(ids)
    for pause in poll_pauses(timeout):
        done, failed = peer.finished(pending)
        if failed:
            first = next(iter(failed))
            raise BenchRunFailed(f"{what}: saga {first} ended {failed[first]}")
        pending = [i for i in pending if i not in done]
        if not pending:
            return
        time.sleep(pause)
    done, _ = peer.finished(pending)
    pending = [i for i in pending if i not in done]
    if pending:
        raise BenchTimeout(
            f"{what}: {len(pending)} of {len(ids)} sagas not finished after "
            f"{timeout:g}s (first: {pending[0]})"
        )


# -- DBOS ------------------------------------------------------------------------------------


class DbosExecutor(WorkerProcess):
    """`python -m bench.peer_dbos`: launched, stopped and cleaned up like a Celery worker."""

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.peer_dbos"]


class DbosPeer(Peer):
    key = "dbos"
    store = "postgres"
    EXECUTORS = 2

    def __init__(
        self, res: Any, tmp: Path, log: Callable[[str], None], polling_interval: float
    ) -> None:
        self.res, self.tmp, self.log = res, tmp, log
        self.polling_interval = polling_interval
        self.executors: list[DbosExecutor] = []
        self.client: Any = None
        self.url = ""

    def system(self) -> str:
        return f"DBOS {version('dbos')}"

    def settings(self) -> dict[str, Any]:
        return {
            "executors": self.EXECUTORS,
            "queue_polling_interval_s": self.polling_interval,
            "steps_per_workflow": 4,
        }

    def start(self) -> None:
        from dbos import DBOSClient

        from bench.peer_dbos import APP_NAME

        name = f"sagaline_bench_dbos_{uuid.uuid4().hex[:10]}"
        self.url = url = f"postgresql://{SHARED_PG_USER}@{SHARED_PG_HOST}:{SHARED_PG_PORT}/{name}"
        # Pushed before it exists (DROP DATABASE IF EXISTS): a signal during the CREATE
        # still drops it; pushed before the executors, so it is dropped after they stop.
        self.res.push(f"database {name}", lambda: drop_database(url))
        shared_postgres_url(name)
        self.log(f"[dbos] system database {name}")
        # One after the other: the first creates DBOS's schema, the second finds it.
        for n in range(1, self.EXECUTORS + 1):
            executor = f"bench-dbos-{n}"
            w = DbosExecutor(
                "bench.peer_dbos",
                name=f"{executor}-{uuid.uuid4().hex[:6]}",
                env={
                    "BENCH_DBOS_URL": url,
                    "BENCH_DBOS_EXECUTOR": executor,
                    "BENCH_DBOS_POLL": str(self.polling_interval),
                },
                workdir=self.tmp / f"peer-{executor}-{uuid.uuid4().hex[:6]}",
                ready_timeout=90,
            )
            # Pushed before it starts: a signal during the start still stops its group.
            self.res.push(
                f"DBOS executor {w.name}", lambda w=w: w.stop(timeout=self.res.stop_timeout)
            )
            w.start()
            self.executors.append(w)
            self.log(f"[dbos] executor {executor} ready (pid {w.pid})")
        self.res.push("DBOS client", self.close_client)
        self.client = DBOSClient(system_database_url=url, application_name=APP_NAME)

    def submit(self) -> str:
        from bench.peer_dbos import QUEUE, WORKFLOW

        handle = self.client.enqueue({"workflow_name": WORKFLOW, "queue_name": QUEUE})
        return str(handle.get_workflow_id())

    def finished(self, ids: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        done: set[str] = set()
        failed: dict[str, str] = {}
        for i in range(0, len(ids), READ_BATCH):
            for st in self.client.list_workflows(
                workflow_ids=list(ids[i : i + READ_BATCH]), load_input=False, load_output=False
            ):
                if st.status == "SUCCESS":
                    done.add(st.workflow_id)
                elif st.status not in ("ENQUEUED", "PENDING", "DELAYED"):
                    failed[st.workflow_id] = st.status
        return done, failed

    def batch_notes(self, ids: Sequence[str]) -> dict[str, Any]:
        """How the batch was split between the executors: they share one queue."""
        split: dict[str, int] = {}
        for i in range(0, len(ids), READ_BATCH):
            for st in self.client.list_workflows(
                workflow_ids=list(ids[i : i + READ_BATCH]), load_input=False, load_output=False
            ):
                split[str(st.executor_id)] = split.get(str(st.executor_id), 0) + 1
        return {"workflows_per_executor": dict(sorted(split.items()))}

    def close_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.destroy()

    def stop(self) -> None:
        """Everything of DBOS's, at once: the cleanup at the end finds nothing left to do."""
        self.close_client()
        for w in self.executors:
            w.stop(timeout=self.res.stop_timeout)
        if self.url:
            drop_database(self.url)


# -- celery-saga --------------------------------------------------------------------------------


class CelerySagaPeer(Peer):
    key = "celery-saga"
    store = "redis"

    def __init__(
        self, res: Any, tmp: Path, log: Callable[[str], None], env: dict[str, str]
    ) -> None:
        self.res, self.tmp, self.log, self.env = res, tmp, log, env
        self.worker: WorkerProcess | None = None
        self.mod: Any = None
        self.redis: Any = None

    def system(self) -> str:
        return f"celery-saga {version('celery-saga')}"

    def settings(self) -> dict[str, Any]:
        return {
            "worker": "prefork -c 2",
            "state": "one JSON document per saga in Redis",
            "steps_per_saga": 4,
        }

    def start(self) -> None:
        import redis

        from bench import peer_celery_saga as mod

        self.mod = mod
        w = WorkerProcess(
            "bench.peer_celery_saga",
            env=self.env,
            pool="prefork",
            concurrency=2,
            queues=[mod.QUEUE],
            loglevel="WARNING",
            name=f"bench-celery-saga-{uuid.uuid4().hex[:6]}",
            workdir=self.tmp / f"peer-celery-saga-{uuid.uuid4().hex[:6]}",
            ready_timeout=90,
        )
        self.res.push(f"worker {w.name}", lambda: w.stop(timeout=self.res.stop_timeout))
        w.start()
        self.worker = w
        self.log(f"[celery-saga] worker {w.name} ready (pid {w.pid}, children {w.child_pids()})")
        self.redis = redis.Redis.from_url(
            mod.STATE_URL, socket_timeout=30, socket_connect_timeout=10
        )
        self.res.push("celery-saga state client", self.redis.close)

    def submit(self) -> str:
        from celery import current_app

        # celery-saga sends its chain through Celery's *current* app: make it ours for the call.
        previous = current_app._get_current_object()
        self.mod.app.set_current()
        try:
            return str(self.mod.saga.run(queue=self.mod.QUEUE).saga_id)
        finally:
            previous.set_current()

    def finished(self, ids: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        import json

        from celery_saga.backends import RedisSagaBackend

        done: set[str] = set()
        failed: dict[str, str] = {}
        for i in range(0, len(ids), READ_BATCH):
            chunk = list(ids[i : i + READ_BATCH])
            raw = self.redis.mget([f"{RedisSagaBackend.PREFIX}{s}" for s in chunk])
            for saga_id, value in zip(chunk, raw, strict=True):
                if not value:
                    continue
                status = json.loads(value)["status"]
                if status == "completed":
                    done.add(saga_id)
                elif status in ("compensated", "failed"):
                    failed[saga_id] = status
        return done, failed

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=self.res.stop_timeout)


# -- figures ------------------------------------------------------------------------------------


def peer_l1(peer: Peer, side: ChainSide, sizes: Sizes) -> dict[str, Any]:
    peer_s: list[float] = []
    chain_s: list[float] = []

    def peer_once(record: bool) -> None:
        t0 = time.perf_counter()
        saga_id = peer.submit()
        wait_peer(peer, [saga_id], timeout=WAIT, what=f"[{peer.key}] L1")
        if record:
            peer_s.append(time.perf_counter() - t0)

    def chain_once(record: bool) -> None:
        elapsed = run_chain(side, 4)
        if record:
            chain_s.append(elapsed)

    alternate(sizes.warmup, lambda: peer_once(False), lambda: chain_once(False))
    alternate(sizes.l1_runs, lambda: peer_once(True), lambda: chain_once(True))
    p, c = ms_stats(peer_s), ms_stats(chain_s)
    return {
        "figure": "L1",
        "peer": peer.key,
        "system": peer.system(),
        "store": peer.store,
        "runs": sizes.l1_runs,
        "steps": 4,
        "peer_median_ms": p["median_ms"],
        "peer_p95_ms": p["p95_ms"],
        "baseline_median_ms": c["median_ms"],
        "baseline_p95_ms": c["p95_ms"],
        "ratio_median": ratio(p["median_ms"], c["median_ms"]),
        "ratio_p95": ratio(p["p95_ms"], c["p95_ms"]),
        "settings": peer.settings(),
    }


def peer_throughput(peer: Peer, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids = [peer.submit() for _ in range(n)]
    submitted = time.perf_counter() - t0
    wait_peer(peer, ids, timeout=BATCH_WAIT, what=f"[{peer.key}] T1")
    return {
        "seconds": time.perf_counter() - t0,
        "submit_seconds": submitted,
        "notes": peer.batch_notes(ids),
    }


def peer_t1(peer: Peer, side: ChainSide, sizes: Sizes) -> dict[str, Any]:
    n = sizes.t1_sagas
    peer_runs: list[dict[str, Any]] = []
    chain_runs: list[dict[str, float]] = []
    alternate(
        sizes.t1_rounds,
        lambda: peer_runs.append(peer_throughput(peer, n)),
        lambda: chain_runs.append(throughput_chains(side, n)),
    )
    p = statistics.median(r["seconds"] for r in peer_runs)
    c = statistics.median(r["seconds"] for r in chain_runs)
    return {
        "figure": "T1",
        "peer": peer.key,
        "system": peer.system(),
        "store": peer.store,
        "sagas": n,
        "steps": 4,
        "rounds": len(peer_runs),
        "peer_seconds": round(p, 3),
        "peer_per_s": round(n / p, 1),
        "baseline_seconds": round(c, 3),
        "baseline_per_s": round(n / c, 1),
        "ratio_throughput": ratio(n / p, n / c),
        "peer_submit_seconds": round(statistics.median(r["submit_seconds"] for r in peer_runs), 3),
        "settings": peer.settings(),
        **peer_runs[-1]["notes"],
    }


def run_peers(
    *,
    figures: Sequence[str],
    sizes: Sizes,
    mod: Any,
    results: TaskResults,
    env: dict[str, str],
    tmp: Path,
    res: Any,
    emit: Callable[[dict[str, Any]], None],
    log: Callable[[str], None],
    dbos_polling_interval: float,
) -> None:
    """Each peer in turn: start it, its figures (with the chain beside), stop it."""
    peers: list[Peer] = [
        DbosPeer(res, tmp, log, dbos_polling_interval),
        CelerySagaPeer(res, tmp, log, env),
    ]
    for peer in peers:
        side = ChainSide(mod=mod, results=results, store=peer.key)
        started = time.monotonic()
        log(f"[{peer.key}] starting {peer.system()}")
        peer.start()
        try:
            if "L1" in figures:
                log(f"[{peer.key}] L1 ...")
                emit(peer_l1(peer, side, sizes))
            if "T1" in figures:
                log(f"[{peer.key}] T1 ...")
                emit(peer_t1(peer, side, sizes))
        finally:
            peer.stop()
        log(f"[{peer.key}] done in {time.monotonic() - started:.1f}s")


# -- the comparison table --------------------------------------------------------------------------

STORE_NAMES = {"postgres": "PostgreSQL", "sqlite": "SQLite", "redis": "Redis"}


def comparison_rows(lines: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per system and store: L1 and T1, each with its chain and ratio."""
    systems: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for d in lines:
        if d.get("figure") not in FIGURES:
            continue
        system = d["system"] if "peer" in d else "sagaline"
        systems.setdefault((system, d["store"]), {})[d["figure"]] = d
    out = []
    for (system, store), figs in systems.items():
        who = "peer" if system != "sagaline" else "sagaline"
        l1, t1 = figs.get("L1"), figs.get("T1")
        out.append(
            (
                system,
                STORE_NAMES.get(store, store),
                f"{l1[f'{who}_median_ms']:.1f} ms vs {l1['baseline_median_ms']:.1f} ms"
                if l1
                else "",
                f"{l1['ratio_median']:.2f}x" if l1 else "",
                f"{t1[f'{who}_per_s']:.0f}/s vs {t1['baseline_per_s']:.0f}/s" if t1 else "",
                f"{t1['ratio_throughput']:.2f}x" if t1 else "",
            )
        )
    return out


def print_comparison(lines: Sequence[dict[str, Any]]) -> None:
    header = ("system", "state", "L1 (median) vs chain", "L1 ratio", "T1 vs chain", "T1 ratio")
    print_rows(
        "sagaline and its peers, each against the plain Celery chain measured beside it "
        "(L1: lower is better; T1: higher is better)",
        header,
        comparison_rows(lines),
    )
