"""`python -m bench`: start Redis and workers, run every figure for each store, print results.

Stdout: one JSON line per figure (per store), then a table of ratios; with --peers, also
the figures of DBOS and celery-saga (bench/peers.py) and a table of every system's ratios.
Stderr: progress. Every process started here is stopped by pid at the end, and
every temporary database dropped: also on SIGTERM or SIGINT (Ctrl-C), after which
the exit status is 128 + the signal's number. A saga or chain that does not
finish in time fails the run (exit status 1) with a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from bench.waits import BenchRunFailed, BenchTimeout, TaskResults
from tests.harness import (
    SHARED_PG_HOST,
    SHARED_PG_PORT,
    SHARED_PG_USER,
    HarnessError,
    PrivateRedis,
    WorkerProcess,
    drop_database,
    shared_postgres_url,
)

ALL_FIGURES = ("L1", "L2", "G1", "S1", "T1", "H1", "R1", "MEM", "OBS", "VOL")
# H1 on the Redis store: Redis holds the whole history in memory, ~5.5 KB per
# finished saga (5.5 GB for a million), and loads ~5,000 sagas a second.
REDIS_HISTORY = 200_000
STOP_TIMEOUT = 15.0  # seconds a worker has for a warm shutdown at the end of a run
HURRIED_STOP_TIMEOUT = 5.0  # ... and after SIGTERM / SIGINT


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts and the sqlite store only (the smoke test)",
    )
    p.add_argument(
        "--stores",
        default=None,
        help="comma-separated: postgres,sqlite[,redis] (default: all available; --quick: sqlite)",
    )
    p.add_argument("--only", default=None, help=f"comma-separated figures of {ALL_FIGURES}")
    p.add_argument(
        "--history",
        type=int,
        default=None,
        help="finished sagas preloaded for H1 (default 1000000; --quick 1000)",
    )
    p.add_argument(
        "--redis-history",
        type=int,
        default=None,
        help=f"the same for the Redis store, which keeps it in memory "
        f"(default: the smaller of --history and {REDIS_HISTORY})",
    )
    p.add_argument(
        "--vol-events",
        type=int,
        default=None,
        help="events in VOL's database (PostgreSQL only; default 10000000, kept between "
        "runs; --quick 14000)",
    )
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after the figures of each store, record the pool processes with "
        "py-spy under a T1 load and write the profiles to DIR",
    )
    p.add_argument("--profile-seconds", type=float, default=20.0)
    p.add_argument(
        "--t1-sagas",
        type=int,
        default=None,
        help="sagas (and chains) per T1 batch (default 1000; --quick 20)",
    )
    p.add_argument(
        "--t1-rounds",
        type=int,
        default=None,
        help="T1 batches per side, alternated; the figure is their median (default 3; "
        "--quick 1). One batch a side moved Redis's ratio by 0.66x-0.85x in one hour",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=POOL_PROCESSES,
        help=f"pool processes of every worker of the run, sagaline's and the plain one's "
        f"(-P prefork -c N; default {POOL_PROCESSES}, what Celery picks on a 2-core machine)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="after sagaline's figures, L1 and T1 on DBOS (PostgreSQL, two "
        "executors) and celery-saga (Redis), each beside the plain chain; "
        "needs the bench-peers extra",
    )
    p.add_argument(
        "--dbos-polling-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often DBOS's executors poll their queue (--peers; default 0.05)",
    )
    return p.parse_args(argv)


def available_stores() -> list[str]:
    stores = ["postgres", "sqlite"]
    if importlib.util.find_spec("sagaline.stores.redis") is not None:
        stores.append("redis")
    return stores


class Interrupted(BaseException):
    """SIGTERM or SIGINT: a BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signal that interrupted this run. Raised in whatever code the main thread was in,
# Interrupted may come out as another exception: a library's cleanup that fails
# because it was cut short (SQLAlchemy's pool ping, say) raises its own error instead.
_received: list[int] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _on_signals(_already_stopping)  # at most one Interrupted, whatever follows
    _received.append(signum)
    raise Interrupted(signum)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    # A second Ctrl-C must not abandon the cleanup halfway: it is bounded anyway.
    log(f"{signal.Signals(signum).name} received: already stopping")


def _on_signals(handler: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


class Resources:
    """Everything started or created, released in reverse order whatever happens."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any]] = []
        self.stop_timeout = STOP_TIMEOUT

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
        name = f"sagaline_bench_{uuid.uuid4().hex[:10]}"
        url = f"postgresql+psycopg://{SHARED_PG_USER}@{SHARED_PG_HOST}:{SHARED_PG_PORT}/{name}"
        # Pushed before it exists (DROP DATABASE IF EXISTS): a signal during the
        # CREATE still drops it.
        res.push(f"database {name}", lambda: drop_database(url))
        if shared_postgres_url(name) != url:
            raise HarnessError(f"unexpected URL for the shared PostgreSQL database {name}")
        return url
    if store == "sqlite":
        return f"sqlite:///{tmp / 'bench-state.db'}"
    if store == "redis":
        return f"redis://127.0.0.1:{redis_port}/3"
    raise SystemExit(f"unknown store {store!r}; use postgres, sqlite or redis")


# Pool processes of each worker this run starts (--concurrency).
POOL_PROCESSES = 2
_pool = [POOL_PROCESSES]


def start_worker(
    flavor: str,
    env: dict[str, str],
    tmp: Path,
    res: Resources,
    extra_env: dict[str, str] | None = None,
) -> WorkerProcess:
    queue = "bench.saga" if flavor == "sagaline" else "bench.plain"
    queue = (extra_env or {}).get("BENCH_SAGA_QUEUE", queue)
    w = WorkerProcess(
        "bench.app",
        env={**env, **(extra_env or {}), "BENCH_FLAVOR": flavor},
        pool="prefork",
        concurrency=_pool[0],
        queues=[queue],
        loglevel="WARNING",
        name=f"bench-{flavor}-{uuid.uuid4().hex[:6]}",
        workdir=tmp / f"worker-{flavor}-{uuid.uuid4().hex[:6]}",
        ready_timeout=90,
    )
    # Pushed before it starts: a signal during the start still stops its process group.
    res.push(f"worker {w.name}", lambda: w.stop(timeout=res.stop_timeout))
    w.start()
    log(f"worker {w.name} ready (pid {w.pid}, children {w.child_pids()})")
    return w


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0, 1 when a figure failed, 128 + signum when interrupted."""
    _received.clear()
    _on_signals(_interrupt)
    res = Resources()
    try:
        return run(parse_args(argv), res)
    except BaseException as exc:
        if not _received:
            if isinstance(exc, (BenchTimeout, BenchRunFailed, HarnessError)):
                log(f"failed: {exc}")
                return 1
            raise
        signum = _received[0]
        masked = "" if isinstance(exc, Interrupted) else f" (it surfaced as {exc!r})"
        log(f"{signal.Signals(signum).name}: stopping every process this run started{masked}")
        res.stop_timeout = HURRIED_STOP_TIMEOUT
        return 128 + signum
    finally:
        try:
            _on_signals(_already_stopping)
        finally:  # even if the signal came just before the line above
            res.close()
            log("stopped")


def run(args: argparse.Namespace, res: Resources) -> int:
    figures = [f.strip().upper() for f in (args.only or ",".join(ALL_FIGURES)).split(",")]
    unknown = [f for f in figures if f not in ALL_FIGURES]
    if unknown:
        raise SystemExit(f"unknown figures {unknown}; choose from {ALL_FIGURES}")
    if args.peers:
        from bench.peers import FIGURES as PEER_FIGURES
        from bench.peers import require_peers

        require_peers()
        if not set(figures) & set(PEER_FIGURES):
            raise SystemExit(f"--peers measures {PEER_FIGURES}: include one in --only")
    if args.dbos_polling_interval is not None and not (
        args.peers and args.dbos_polling_interval > 0
    ):
        raise SystemExit(
            f"--dbos-polling-interval {args.dbos_polling_interval:g}: a number of "
            f"seconds above 0, with --peers"
        )
    if args.t1_sagas is not None and args.t1_sagas < 1:
        raise SystemExit(f"--t1-sagas must be at least 1, not {args.t1_sagas}")
    if args.t1_rounds is not None and args.t1_rounds < 1:
        raise SystemExit(f"--t1-rounds must be at least 1, not {args.t1_rounds}")
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency must be at least 1, not {args.concurrency}")
    _pool[0] = args.concurrency
    stores = [
        s.strip()
        for s in (args.stores or ("sqlite" if args.quick else ",".join(available_stores()))).split(
            ","
        )
    ]
    history = args.history if args.history is not None else (1000 if args.quick else 1_000_000)
    redis_history = (
        args.redis_history if args.redis_history is not None else min(history, REDIS_HISTORY)
    )

    tmp = Path(tempfile.mkdtemp(prefix="sagaline-bench-"))
    res.push(f"temp dir {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    lines: list[dict[str, Any]] = []
    out = open(args.json_out, "w") if args.json_out else None  # noqa: SIM115
    try:
        redis_server = PrivateRedis(start=False)
        res.push("redis-server", redis_server.destroy)
        redis_server.start()
        port = redis_server.port
        log(f"redis-server ready (pid {redis_server.pid}, port {port})")
        env = {
            "BENCH_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "BENCH_RESULT_URL": f"redis://127.0.0.1:{port}/1",
            "BENCH_COUNTER_URL": f"redis://127.0.0.1:{port}/2",
            "BENCH_PEER_STATE_URL": f"redis://127.0.0.1:{port}/4",
            "BENCH_COUNT_SQL": "1",
            "SAGALINE_HOME": str(tmp / "home"),
        }
        os.environ.update({**env, "BENCH_FLAVOR": "caller"})
        import redis

        import sagaline
        from bench import app as mod
        from bench import figures as fig
        from bench.report import print_table

        counters = redis.Redis.from_url(
            env["BENCH_COUNTER_URL"], socket_timeout=30, socket_connect_timeout=10
        )
        res.push("redis client", counters.close)
        results = TaskResults(mod.app, env["BENCH_RESULT_URL"])
        res.push("result reader", results.close)
        sizes = (fig.Sizes.quick if args.quick else fig.Sizes.full)(history, redis_history)
        if args.t1_sagas is not None:
            sizes.t1_sagas = args.t1_sagas
        if args.t1_rounds is not None:
            sizes.t1_rounds = args.t1_rounds
        if args.vol_events is not None:
            sizes.vol_events = args.vol_events
        log(f"stores {stores}, figures {figures}, sizes {sizes}, pool processes {_pool[0]}")
        plain = start_worker("plain", env, tmp, res)

        def emit(line: dict[str, Any]) -> None:
            line.setdefault("pool_processes", _pool[0])
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
            b = fig.Bench(
                mod=mod,
                store=store,
                store_url=url,
                runtime=runtime,
                saga_worker=worker,
                plain_worker=plain,
                redis=counters,
                results=results,
                sizes=sizes,
                log=log,
            )
            figs: dict[str, dict[str, Any]] = {}
            started = time.monotonic()

            def step(
                name: str,
                fn: Any,
                *a: Any,
                store: str = store,
                figs: dict[str, dict[str, Any]] = figs,
            ) -> None:
                if _received:  # a signal whose Interrupted some library code swallowed
                    raise Interrupted(_received[0])
                t = time.monotonic()
                log(f"[{store}] {name} ...")
                figs[name] = fn(*a)
                emit(figs[name])
                log(f"[{store}] {name} done in {time.monotonic() - t:.1f}s")

            # H1 compares its L1 and T1 with the empty store's.
            if "L1" in figures or "H1" in figures:
                step("L1", fig.figure_l1, b)
            if "L2" in figures or "H1" in figures:
                step("L2", fig.figure_l2, b)  # also gives H1's listing compensated sagas
            empty_list = fig.list_latency(b, sizes.list_runs) if "H1" in figures else {}
            if "G1" in figures:
                from bench.get_latency import figure_g1

                step("G1", figure_g1, b)
            if "S1" in figures:
                step("S1", fig.figure_s1, b)
            if "T1" in figures or "H1" in figures:
                step("T1", fig.figure_t1, b)
            if "VOL" in figures and store != "postgres":
                log(f"[{store}] VOL: PostgreSQL only, skipped")
            elif "VOL" in figures:
                from bench.volume import figure_vol

                def vol_worker(url: str, queue: str) -> WorkerProcess:
                    extra = {"SAGALINE_STORE_URL": url, "BENCH_SAGA_QUEUE": queue}
                    return start_worker("sagaline", env, tmp, res, extra)

                step("VOL", figure_vol, b, vol_worker)
            if "R1" in figures:
                step("R1", fig.figure_r1, b)
            if "H1" in figures:
                step("H1", fig.figure_h1, b, figs["L1"], figs["T1"], empty_list)
            if "MEM" in figures:
                step("MEM", fig.figure_mem, b)
            if "OBS" in figures:
                from bench.observability import figure_obs

                step("OBS", figure_obs, b, env, tmp, res, start_worker)
            if args.profile:
                from bench.profile import profile_workers

                log(f"[{store}] profiling the pool processes with py-spy")
                try:
                    profile_workers(b, Path(args.profile) / store, args.profile_seconds)
                except Exception as exc:  # a profile is extra: keep the figures going
                    log(f"[{store}] profiling failed: {exc!r}")
            log(f"[{store}] all figures in {time.monotonic() - started:.1f}s")
            worker.stop(timeout=res.stop_timeout)
            if store == "redis":  # give the history's memory back before the next store
                with contextlib.suppress(Exception), redis.Redis.from_url(url) as db:
                    db.flushdb()
            with contextlib.suppress(Exception):
                runtime.store.close()
        if args.peers:
            from bench.peers import DBOS_POLLING_INTERVAL, run_peers

            run_peers(
                figures=figures,
                sizes=sizes,
                mod=mod,
                results=results,
                env=env,
                tmp=tmp,
                res=res,
                emit=emit,
                log=log,
                dbos_polling_interval=args.dbos_polling_interval or DBOS_POLLING_INTERVAL,
            )
        print_table(lines)
        if args.peers:
            from bench.peers import print_comparison

            print_comparison(lines)
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
