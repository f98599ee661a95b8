"""`python -m bench.store_cpu`: sagas per second per CPU core of the state store's server.

A T1-like load: 1,000 4-step no-op sagas (`bench.app`'s noop4) started at once and
run by one sagaline worker (`-P prefork -c 2`), as in T1, with the store on a
server of its own that nothing else uses, so that its CPU time is the store's
work alone:

- postgres: a private PostgreSQL cluster with production durability (`fsync`,
  `synchronous_commit` and `full_page_writes` on); its CPU time is the user +
  system time of every process of the cluster, from /proc: the postmaster
  (with its reaped children's time: backends that exited) and each live child;
- redis: a private redis-server with `appendonly yes` and `appendfsync always`
  (what survives a crash: what the store acknowledged), apart from the broker's;
  its CPU time is `used_cpu_user + used_cpu_sys` (and the same of its children,
  the AOF rewrites) from `INFO cpu`.

The broker is another private redis-server. The CPU time is read before the
sagas are started and once all of them are terminal (the driver waits by counting
terminal sagas every 0.5 s, not with `get()`, so that its reads hardly add to the
store's work), and the figure is sagas / store CPU seconds: the sagas per second
that one core of the store's server keeps up with. Beside it: the worker's CPU
time over the batch (main process and pool processes), and the connections the
store has at its end (the worker's and this driver's).

The floor for the worker's CPU: the same batch as plain Celery chains of 4 no-op
tasks (`bench.app`'s plain worker, same pool settings, its Redis result backend on
the broker's server), measured once before the stores; each store's line gives its
worker CPU per saga beside the plain worker's CPU per chain (`--no-chain` skips it).

Stdout: one JSON line per store. Every process started here is stopped by pid and
every directory deleted, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Resources, log, start_worker
from bench.cpu import process_cpu
from bench.waits import BenchTimeout
from sagaline.states import SAGA_TERMINAL
from sagaline.testing import children_of
from tests.harness import HarnessError, PrivatePostgres, PrivateRedis

STORES = ("postgres", "redis")
WAIT = 600.0  # seconds the batch may take before the run fails
WARMUP = 20  # sagas run first: connections opened, statements prepared
REDIS_CPU = ("user", "sys", "user_children", "sys_children")  # INFO cpu, used_cpu_*
DURABLE_PG = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.store_cpu", description=__doc__)
    p.add_argument("--sagas", type=int, default=1000, help="sagas in the batch (default 1000)")
    p.add_argument(
        "--stores", default=",".join(STORES), help=f"comma-separated, of {','.join(STORES)}"
    )
    p.add_argument("--no-chain", action="store_true", help="skip the plain-chain worker CPU floor")
    args = p.parse_args(argv)
    if args.sagas < 1:
        raise SystemExit(f"--sagas must be at least 1, not {args.sagas}")
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in args.stores if s not in STORES]
    if unknown or not args.stores:
        raise SystemExit(f"unknown stores {unknown}; choose from {','.join(STORES)}")
    return args


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and of its children it has waited for."""
    cpu = process_cpu(pid)
    return 0.0 if cpu is None else sum(cpu)  # exited: its parent counts it once reaped


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and of every live descendant (bounded walk)."""
    total, todo, seen = 0.0, [root], set()
    for _ in range(10_000):
        if not todo:
            break
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += process_cpu_seconds(pid)
        todo.extend(children_of(pid))
    return total


class StoreServer:
    """The store's private server, and how much CPU it has used so far."""

    def __init__(self, store: str, res: Resources) -> None:
        self.store = store
        self.server: PrivatePostgres | PrivateRedis
        if store == "postgres":
            self.server = PrivatePostgres(start=False, settings=DURABLE_PG)
            res.push("store postgres", self.server.destroy)
            self.server.start()
            self.server.create_database(self.server.dbname)
            self._check_durable()
        else:
            self.server = PrivateRedis(appendonly=True, start=False)
            res.push("store redis-server", self.server.destroy)
            self.server.start()
        self.url = self.server.url

    def _check_durable(self) -> None:
        import psycopg

        assert isinstance(self.server, PrivatePostgres)
        with psycopg.connect(self.server.dsn) as conn:
            for name, value in DURABLE_PG.items():
                row = conn.execute(f"SHOW {name}").fetchone()
                if row is None or row[0] != value:
                    raise HarnessError(f"private PostgreSQL runs with {name}={row}, not {value}")

    def connections(self) -> int:
        """Client connections the server has now (this one not counted)."""
        if isinstance(self.server, PrivatePostgres):
            import psycopg

            with psycopg.connect(self.server.dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            return int(row[0]) if row else 0
        import redis

        with redis.Redis.from_url(self.url, socket_timeout=10) as client:
            return int(client.info("clients")["connected_clients"]) - 1

    def cpu_seconds(self) -> float:
        if isinstance(self.server, PrivatePostgres):
            pid = self.server.pid
            if pid is None:
                raise HarnessError("the store's PostgreSQL is not running")
            return tree_cpu_seconds(pid)
        import redis

        with redis.Redis.from_url(self.url, socket_timeout=10) as client:
            info: dict[str, Any] = client.info("cpu")
        return sum(float(info.get(f"used_cpu_{k}", 0.0)) for k in REDIS_CPU)


def wait_terminal(runtime: Any, name: str, count: int, what: str) -> None:
    """Until `count` sagas called `name` are terminal; by counting, every 0.5 s."""
    deadline = time.monotonic() + WAIT
    done = 0
    for _ in range(int(WAIT / 0.5) + 2):
        counts = runtime.store.count_by_status(name)
        done = sum(n for status, n in counts.items() if status in SAGA_TERMINAL)
        if done >= count or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if done < count:
        raise BenchTimeout(f"{what}: {count - done} of {count} sagas not finished after {WAIT}s")


def measure_chains(chains: int, env: dict[str, str], tmp: Path, res: Resources) -> float:
    """Worker CPU seconds (main + pool) for `chains` plain Celery chains of 4 no-ops."""
    from celery import chain

    from bench import app as mod
    from bench.waits import TaskResults

    def noop4() -> Any:
        return chain(*[mod.plain_noop.s() for _ in range(4)])

    results = TaskResults(mod.app, env["BENCH_RESULT_URL"])
    worker = start_worker("plain", env, tmp, res)
    try:
        warm = [noop4().apply_async() for _ in range(WARMUP)]
        results.wait([r.id for r in warm], timeout=WAIT, what="[chain] warm-up")
        time.sleep(1.0)
        batch = [noop4() for _ in range(chains)]
        cpu0 = tree_cpu_seconds(worker.pid)
        sent = [c.apply_async() for c in batch]
        results.wait([r.id for r in sent], timeout=WAIT, what="[chain] batch")
        return tree_cpu_seconds(worker.pid) - cpu0
    finally:
        worker.stop(timeout=res.stop_timeout)
        results.close()


def measure(
    store: str, sagas: int, env: dict[str, str], tmp: Path, res: Resources
) -> dict[str, Any]:
    import sagaline
    from bench import app as mod

    server = StoreServer(store, res)
    log(f"[{store}] store server ready: {server.url}")
    runtime = sagaline.init_app(mod.app, store=server.url, sweeper=False)
    runtime.store.migrate()
    worker = start_worker("sagaline", env, tmp, res, {"SAGALINE_STORE_URL": server.url})
    saga = mod.SAGAS["noop4"]
    for _ in range(WARMUP):
        saga.run()
    wait_terminal(runtime, saga.name, WARMUP, f"[{store}] warm-up")
    time.sleep(1.0)  # the sweeper and autovacuum settle after the warm-up
    cpu0, worker0, t0 = server.cpu_seconds(), tree_cpu_seconds(worker.pid), time.monotonic()
    for _ in range(sagas):
        saga.run()
    submitted = time.monotonic() - t0
    wait_terminal(runtime, saga.name, WARMUP + sagas, f"[{store}] batch")
    seconds = time.monotonic() - t0
    cpu = server.cpu_seconds() - cpu0
    worker_cpu = tree_cpu_seconds(worker.pid) - worker0
    connections = server.connections()  # the worker's processes and this driver's
    worker.stop(timeout=res.stop_timeout)
    runtime.store.close()
    return {
        "figure": "CORE",
        "store": store,
        "sagas": sagas,
        "steps": 4,
        "seconds": round(seconds, 2),
        "submit_seconds": round(submitted, 2),
        "sagas_per_s": round(sagas / seconds, 1),
        "store_cpu_s": round(cpu, 3),
        "store_cores_busy": round(cpu / seconds, 3),
        "sagas_per_s_per_store_core": round(sagas / cpu, 1) if cpu > 0 else None,
        "steps_per_s_per_store_core": round(4 * sagas / cpu, 1) if cpu > 0 else None,
        "store_cpu_ms_per_saga": round(cpu * 1000 / sagas, 3),
        "worker_cpu_s": round(worker_cpu, 3),
        "worker_cpu_ms_per_saga": round(worker_cpu * 1000 / sagas, 3),
        "store_connections": connections,
        "store_settings": (
            "fsync, synchronous_commit, full_page_writes on"
            if store == "postgres"
            else "appendonly yes, appendfsync always"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM as Ctrl-C: unwind, so that `finally` stops every process started here.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    res = Resources()
    tmp = Path(tempfile.mkdtemp(prefix="sagaline-bench-cpu-"))
    res.push(f"temp dir {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        broker = PrivateRedis(start=False)
        res.push("broker redis-server", broker.destroy)
        broker.start()
        env = {
            "BENCH_BROKER_URL": f"redis://127.0.0.1:{broker.port}/0",
            "BENCH_RESULT_URL": f"redis://127.0.0.1:{broker.port}/1",
            "BENCH_COUNTER_URL": f"redis://127.0.0.1:{broker.port}/2",
            "SAGALINE_HOME": str(tmp / "home"),
        }
        os.environ.update({**env, "BENCH_FLAVOR": "caller"})
        chain_cpu = None
        if not args.no_chain:
            log(f"[chain] {args.sagas} plain Celery chains of 4 tasks ...")
            chain_cpu = measure_chains(args.sagas, env, tmp, res)
        for store in args.stores:
            log(f"[{store}] {args.sagas} sagas of 4 steps ...")
            line = measure(store, args.sagas, env, tmp, res)
            if chain_cpu is not None:
                line["chain_worker_cpu_ms_per_chain"] = round(chain_cpu * 1000 / args.sagas, 3)
                line["worker_cpu_vs_chain"] = (
                    round(line["worker_cpu_s"] / chain_cpu, 2) if chain_cpu > 0 else None
                )
            print(json.dumps(line), flush=True)
            log(
                f"[{store}] {line['sagas_per_s_per_store_core']} sagas/s per store core "
                f"({line['store_cpu_s']} CPU-s of the store for {args.sagas} sagas in "
                f"{line['seconds']} s)"
            )
    except (BenchTimeout, HarnessError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        res.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
