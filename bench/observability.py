"""OBS: what metrics and tracing cost: L1 and T1 on a worker with both on against one with both off.

Two sagaline workers of the same store run side by side, each on a queue of its own:
one with `SAGALINE_METRICS_PORT` and `SAGALINE_TRACING=otlp`, one with neither. The
caller alternates its sagas between them (ABBA), tracing on for the sagas it sends to
the first, so both sides pay everything a production deployment pays: the spans are
exported over OTLP/HTTP to a sink this run starts (a process that reads and discards
every POST), and `/metrics` is scraped every SCRAPE_INTERVAL seconds for the whole
figure, store-read gauges included. The overhead is on / off: L1's median latency,
T1's seconds for a batch; the target is <= 1.05 for both.

Wall-clock ratios move with whatever else the machine runs; CPU time far less. So
the figure also reports the CPU time per saga of each side (bench/cpu.py): its
worker's processes (main and pool, user + system) while its sagas ran, plus the
caller's while it started them (not while it polled for their end), and each
worker's CPU per second with no saga at all (scrapes go on meanwhile).

`python -m bench.observability PORT` is the sink itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter
from bench.figures import BATCH_WAIT, Bench, alternate, ms_stats, ratio
from bench.waits import wait_sagas

TARGET = "overhead <= 1.05"
LIMIT = 1.05
SCRAPE_INTERVAL = 1.0  # seconds: harsher than Prometheus's usual 15 s
T1_ROUNDS = 4  # batches per side, alternated
IDLE_SECONDS = 5.0  # each worker's CPU with no saga, scrapes going on
QUEUES = {"on": "bench.saga.on", "off": "bench.saga.off"}
_sinks: list[Sink] = []  # one per run: the caller's TracerProvider is set once per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Sink:
    """The OTLP/HTTP receiver, in a process of its own: reading spans costs the caller nothing."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.observability", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OTLP sink exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                self.stats()
                return
            time.sleep(0.1)
        raise RuntimeError(f"the OTLP sink did not answer on port {self.port}")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as r:
            data: dict[str, int] = json.load(r)
            return data

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class Scraper:
    """GET /metrics every SCRAPE_INTERVAL seconds from a thread, as Prometheus would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self.failures = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    self.bytes += len(r.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def sink(res: Any, tmp: Path) -> Sink:
    if not _sinks:
        s = Sink(tmp / "otlp-sink.log")
        _sinks.append(s)
        res.push("OTLP sink", s.stop)
        res.push("OTLP sink entry", _sinks.clear)
        s.start()
    return _sinks[0]


def figure_obs(
    b: Bench,
    env: dict[str, str],
    tmp: Path,
    res: Any,
    start_worker: Callable[..., Any],
) -> dict[str, Any]:
    sz = b.sizes
    otlp = sink(res, tmp)
    metrics_port = free_port()
    store = {"SAGALINE_STORE_URL": b.store_url}
    on = start_worker(
        "sagaline",
        env,
        tmp,
        res,
        {
            **store,
            "BENCH_SAGA_QUEUE": QUEUES["on"],
            "SAGALINE_METRICS_PORT": str(metrics_port),
            "SAGALINE_TRACING": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_SERVICE_NAME": "sagaline-bench",
        },
    )
    off = start_worker(
        "sagaline",
        env,
        tmp,
        res,
        {**store, "BENCH_SAGA_QUEUE": QUEUES["off"], "SAGALINE_TRACING": "off"},
    )
    # The caller starts each saga's trace (run() stores its context): on for the sagas
    # sent to the traced worker, off for the others.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.url
    os.environ.setdefault("OTEL_SERVICE_NAME", "sagaline-bench")
    original = b.runtime.settings
    settings = {
        "on": dataclasses.replace(original, tracing="otlp"),
        "off": dataclasses.replace(original, tracing="off"),
    }

    def use(side: str) -> None:
        b.mod.ROUTE["saga"] = QUEUES[side]
        b.runtime.settings = settings[side]

    latency: dict[str, list[float]] = {"on": [], "off": []}
    batches: dict[str, list[float]] = {"on": [], "off": []}
    workers = {"on": on, "off": off}
    # CPU seconds of each side's worker (main and pool processes) and of the caller,
    # while that side's sagas run: per figure and side.
    cpu = {
        (fig, side): CpuMeter(workers[side].group_pids)
        for fig in ("L1", "T1")
        for side in ("on", "off")
    }

    saga = b.mod.SAGAS["noop4"]

    def sagas(meter: CpuMeter, n: int, what: str) -> float:
        t0 = time.perf_counter()
        handles = meter.caller(lambda: [saga.run() for _ in range(n)])
        wait_sagas(handles, timeout=BATCH_WAIT, what=f"[{b.store}] {what}")
        return time.perf_counter() - t0

    def l1_once(side: str, record: bool) -> None:
        use(side)
        meter = cpu["L1", side] if record else CpuMeter(lambda: ())
        elapsed = meter.measure(lambda: sagas(meter, 1, f"OBS L1 {side}"))
        if record:
            latency[side].append(elapsed)

    def t1_once(side: str) -> None:
        use(side)
        meter = cpu["T1", side]
        batches[side].append(meter.measure(lambda: sagas(meter, sz.t1_sagas, f"OBS T1 {side}")))

    idle_s = IDLE_SECONDS if sz.l1_runs >= 20 else 1.0  # --quick: a second
    sent_before = otlp.stats()
    try:
        with Scraper(f"http://127.0.0.1:{metrics_port}/metrics") as scraper:
            # What each worker costs with no saga at all (scrapes, polling, threads).
            idle = {side: CpuMeter(workers[side].group_pids) for side in workers}
            idle["on"].measure(lambda: idle["off"].measure(lambda: time.sleep(idle_s)))
            alternate(sz.warmup, lambda: l1_once("on", False), lambda: l1_once("off", False))
            alternate(sz.l1_runs, lambda: l1_once("on", True), lambda: l1_once("off", True))
            alternate(T1_ROUNDS, lambda: t1_once("on"), lambda: t1_once("off"))
    finally:
        b.mod.ROUTE["saga"] = "bench.saga"
        b.runtime.settings = original
    # A warm stop exports what the pool processes still hold.
    on.stop(timeout=res.stop_timeout)
    off.stop(timeout=res.stop_timeout)
    sent = {k: v - sent_before.get(k, 0) for k, v in otlp.stats().items()}
    l_on, l_off = ms_stats(latency["on"]), ms_stats(latency["off"])
    t_on, t_off = statistics.median(batches["on"]), statistics.median(batches["off"])
    l1_overhead = ratio(l_on["median_ms"], l_off["median_ms"])
    t1_overhead = ratio(t_on, t_off)
    cpu_ms = {
        (fig, side): meter.per_saga_ms(sz.l1_runs if fig == "L1" else sz.t1_sagas * T1_ROUNDS)
        for (fig, side), meter in cpu.items()
    }
    return {
        "figure": "OBS",
        "store": b.store,
        "l1_runs": sz.l1_runs,
        "l1_on_median_ms": l_on["median_ms"],
        "l1_off_median_ms": l_off["median_ms"],
        "l1_on_p95_ms": l_on["p95_ms"],
        "l1_off_p95_ms": l_off["p95_ms"],
        "l1_overhead": l1_overhead,
        "t1_sagas": sz.t1_sagas,
        "t1_rounds": T1_ROUNDS,
        "t1_on_per_s": round(sz.t1_sagas / t_on, 1),
        "t1_off_per_s": round(sz.t1_sagas / t_off, 1),
        "t1_on_rounds_s": [round(x, 3) for x in batches["on"]],
        "t1_off_rounds_s": [round(x, 3) for x in batches["off"]],
        "t1_overhead": t1_overhead,
        "within_target": l1_overhead <= LIMIT and t1_overhead <= LIMIT,
        # CPU milliseconds per saga: the worker's processes, the caller, and both.
        "l1_on_cpu_ms": cpu_ms["L1", "on"],
        "l1_off_cpu_ms": cpu_ms["L1", "off"],
        "l1_cpu_overhead": ratio(cpu_ms["L1", "on"]["total_ms"], cpu_ms["L1", "off"]["total_ms"]),
        "t1_on_cpu_ms": cpu_ms["T1", "on"],
        "t1_off_cpu_ms": cpu_ms["T1", "off"],
        "t1_cpu_overhead": ratio(cpu_ms["T1", "on"]["total_ms"], cpu_ms["T1", "off"]["total_ms"]),
        "idle_on_cpu_ms_per_s": round(idle["on"].worker_s * 1000 / idle_s, 2),
        "idle_off_cpu_ms_per_s": round(idle["off"].worker_s * 1000 / idle_s, 2),
        "cpu_within_target": max(
            ratio(cpu_ms["L1", "on"]["total_ms"], cpu_ms["L1", "off"]["total_ms"]),
            ratio(cpu_ms["T1", "on"]["total_ms"], cpu_ms["T1", "off"]["total_ms"]),
        )
        <= LIMIT,
        "otlp_requests": sent.get("requests", 0),
        "otlp_bytes": sent.get("bytes", 0),
        "metrics_scrapes": scraper.scrapes,
        "metrics_scrape_failures": scraper.failures,
        "metrics_bytes": scraper.bytes,
        "overhead_is": "on / off: L1 median latency; T1 seconds per batch of t1_sagas",
        "cpu_overhead_is": "on / off: CPU time per saga of the side's worker processes (main "
        "and pool) while that side's sagas ran, plus the caller's while it started them",
        "target": TARGET,
    }


# -- the sink process ---------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    counts = {"requests": 0, "bytes": 0}
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            self.counts["requests"] += 1
            self.counts["bytes"] += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with self.lock:
            body = json.dumps(self.counts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
