"""`python -m bench`: start Redis and workers, run every figure for each store, print results.

Stdout: one JSON line per figure (per store), then a table of ratios.
Stderr: progress. Every process started here is stopped by pid at the end, and
every temporary database dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.harness import PrivateRedis, WorkerProcess, drop_database, shared_postgres_url

ALL_FIGURES = ("L1", "L2", "S1", "T1", "H1", "R1", "MEM")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny counts and the sqlite store only (the smoke test)")
    p.add_argument("--stores", default=None,
                   help="comma-separated: postgres,sqlite[,redis] (default: all available; "
                        "--quick: sqlite)")
    p.add_argument("--only", default=None, help=f"comma-separated figures of {ALL_FIGURES}")
    p.add_argument("--history", type=int, default=None,
                   help="finished sagas preloaded for H1 (default 1000000; --quick 1000)")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the figures of each store, record the pool processes with "
                        "py-spy under a T1 load and write the profiles to DIR")
    p.add_argument("--profile-seconds", type=float, default=20.0)
    return p.parse_args(argv)


def available_stores() -> list[str]:
    stores = ["postgres", "sqlite"]
    if importlib.util.find_spec("sagaline.stores.redis") is not None:
        stores.append("redis")
    return stores


class Resources:
    """Everything started or created, released in reverse order whatever happens."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any]] = []

    def push(self, what: str, fn: Any) -> None:
        self._undo.append((what, fn))

    def close(self) -> None:
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:
                log(f"cleanup of {what} failed: {exc!r}")


def store_url(store: str, res: Resources, tmp: Path, redis_port: int) -> str:
    if store == "postgres":
        url = shared_postgres_url(f"sagaline_bench_{uuid.uuid4().hex[:10]}")
        res.push(f"database {url}", lambda: drop_database(url))
        return url
    if store == "sqlite":
        return f"sqlite:///{tmp / 'bench-state.db'}"
    if store == "redis":
        return f"redis://127.0.0.1:{redis_port}/3"
    raise SystemExit(f"unknown store {store!r}; use postgres, sqlite or redis")


def start_worker(flavor: str, env: dict[str, str], tmp: Path, res: Resources,
                 extra_env: dict[str, str] | None = None) -> WorkerProcess:
    queue = "bench.saga" if flavor == "sagaline" else "bench.plain"
    w = WorkerProcess(
        "bench.app", env={**env, **(extra_env or {}), "BENCH_FLAVOR": flavor},
        pool="prefork", concurrency=2, queues=[queue], loglevel="WARNING",
        name=f"bench-{flavor}-{uuid.uuid4().hex[:6]}",
        workdir=tmp / f"worker-{flavor}-{uuid.uuid4().hex[:6]}", ready_timeout=90)
    res.push(f"worker {w.name}", w.stop)
    w.start()
    log(f"worker {w.name} ready (pid {w.pid}, children {w.child_pids()})")
    return w


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = [f.strip().upper() for f in (args.only or ",".join(ALL_FIGURES)).split(",")]
    unknown = [f for f in figures if f not in ALL_FIGURES]
    if unknown:
        raise SystemExit(f"unknown figures {unknown}; choose from {ALL_FIGURES}")
    stores = [s.strip() for s in (args.stores or ("sqlite" if args.quick else
                                                  ",".join(available_stores()))).split(",")]
    history = args.history if args.history is not None else (1000 if args.quick else 1_000_000)

    res = Resources()
    tmp = Path(tempfile.mkdtemp(prefix="sagaline-bench-"))
    res.push(f"temp dir {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    lines: list[dict[str, Any]] = []
    out = open(args.json_out, "w") if args.json_out else None  # noqa: SIM115
    try:
        redis_server = PrivateRedis()
        res.push("redis-server", redis_server.destroy)
        port = redis_server.port
        env = {
            "BENCH_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "BENCH_RESULT_URL": f"redis://127.0.0.1:{port}/1",
            "BENCH_COUNTER_URL": f"redis://127.0.0.1:{port}/2",
            "BENCH_COUNT_SQL": "1",
            "SAGALINE_HOME": str(tmp / "home"),
        }
        os.environ.update({**env, "BENCH_FLAVOR": "caller"})
        import redis

        import sagaline
        from bench import app as mod
        from bench import figures as fig
        from bench.report import print_table

        counters = redis.Redis.from_url(env["BENCH_COUNTER_URL"])
        res.push("redis client", counters.close)
        sizes = (fig.Sizes.quick if args.quick else fig.Sizes.full)(history)
        log(f"stores {stores}, figures {figures}, sizes {sizes}")
        plain = start_worker("plain", env, tmp, res)

        def emit(line: dict[str, Any]) -> None:
            text = json.dumps(line, sort_keys=False)
            print(text, flush=True)
            if out is not None:
                out.write(text + "\n")
                out.flush()
            lines.append(line)

        for store in stores:
            url = store_url(store, res, tmp, port)
            runtime = sagaline.init_app(mod.app, store=url, sweeper=False)
            runtime.store.migrate()  # before the workers start, so that none of them races
            worker = start_worker("sagaline", env, tmp, res, {"SAGALINE_STORE_URL": url})
            b = fig.Bench(mod=mod, store=store, store_url=url, runtime=runtime,
                          saga_worker=worker, plain_worker=plain, redis=counters,
                          sizes=sizes, log=log)
            results: dict[str, dict[str, Any]] = {}
            started = time.monotonic()

            def step(name: str, fn: Any, *a: Any, store: str = store,
                     results: dict[str, dict[str, Any]] = results) -> None:
                t = time.monotonic()
                log(f"[{store}] {name} ...")
                results[name] = fn(*a)
                emit(results[name])
                log(f"[{store}] {name} done in {time.monotonic() - t:.1f}s")

            if "L1" in figures or "H1" in figures:
                step("L1", fig.figure_l1, b)
            if "L2" in figures or "H1" in figures:
                step("L2", fig.figure_l2, b)  # also gives H1's listing compensated sagas
            empty_list = fig.list_latency(b, sizes.list_runs) if "H1" in figures else {}
            if "S1" in figures:
                step("S1", fig.figure_s1, b)
            if "T1" in figures or "H1" in figures:
                step("T1", fig.figure_t1, b)
            if "R1" in figures:
                step("R1", fig.figure_r1, b)
            if "H1" in figures:
                if store == "redis":
                    log("[redis] H1: no bulk history loader for the Redis store; skipped")
                else:
                    step("H1", fig.figure_h1, b, results["L1"], results["T1"], empty_list)
            if "MEM" in figures:
                step("MEM", fig.figure_mem, b)
            if args.profile:
                from bench.profile import profile_workers

                log(f"[{store}] profiling the pool processes with py-spy")
                try:
                    profile_workers(b, Path(args.profile) / store, args.profile_seconds)
                except Exception as exc:  # a profile is extra: keep the figures going
                    log(f"[{store}] profiling failed: {exc!r}")
            log(f"[{store}] all figures in {time.monotonic() - started:.1f}s")
            worker.stop()
            with contextlib.suppress(Exception):
                runtime.store.close()
        print_table(lines)
    finally:
        if out is not None:
            out.close()
        res.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
