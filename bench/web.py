"""`python -m bench.web`: server time of the dashboard and the REST API on a big store.

Loads N sagas (default 1,000,000) straight into a fresh PostgreSQL database, in bulk
(INSERT ... SELECT over generate_series; 90% COMPLETED, 9% COMPENSATED, 1% FAILED,
over 30 days, with the steps of the FAILED ones), plus one saga of 64 steps and 1,000
events. Then starts a real `sagaline web` process on it (read only) and times, with
one client, sequential requests: `GET /api/v1/sagas` (no filter, a status, a name and
a status, the next page), the list page, and the 64-step saga's page and JSON, and
200 of its events read backwards (the page's "show earlier events").
Stdout: one JSON line per figure with p50/p95/max in milliseconds, and the server's
CPU time per request (Linux), which a busy machine does not inflate. Nothing asserts
a time; the database is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.harness import REPO_ROOT, drop_database, free_port, shared_postgres_url

SAGALINE = str(Path(sys.executable).parent / "sagaline")
SPAN = 30 * 86400.0
BIG = "bench-web-64-steps"


def log(msg: str) -> None:
    print(f"[bench.web {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(url: str, n: int) -> None:
    import psycopg

    from sagaline import ops

    ops.migrate(url)
    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    t0 = time.time() - SPAN
    dt = SPAN / max(n, 1)
    sid = "lpad(to_hex(i), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i), 12, '0')"
    status = (
        "CASE WHEN i % 100 = 1 THEN 'FAILED' WHEN i % 11 = 0 THEN 'COMPENSATED' "
        "ELSE 'COMPLETED' END"
    )
    with psycopg.connect(dsn) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(f"""
            INSERT INTO sagaline_sagas (saga_id, name, status, input, fingerprint, created_at,
                updated_at, finished_at, error, failed_step, version)
            SELECT {sid}, 'bench.web.' || (i % 8), {status}, json_build_object('order', i),
                'web', {t0} + i * {dt}, {t0} + i * {dt} + 0.05, {t0} + i * {dt} + 0.05,
                CASE WHEN {status} <> 'COMPLETED' THEN 'BenchFailure: on purpose' END,
                CASE WHEN {status} <> 'COMPLETED' THEN 's2' END, 3
            FROM generate_series(1, {int(n)}) AS i""")
        conn.execute(f"""
            INSERT INTO sagaline_steps (saga_id, name, position, status, attempt, comp_status,
                comp_attempt, has_compensation_data, comp_error, version)
            SELECT {sid}, 's' || k, k - 1, CASE WHEN k = 2 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                1, CASE WHEN k = 1 THEN 'COMPENSATION_FAILED' END, 1, FALSE,
                CASE WHEN k = 1 THEN 'BenchFailure: undo fails' END, 3
            FROM generate_series(1, {int(n)}) AS i CROSS JOIN generate_series(1, 2) AS k
            WHERE i % 100 = 1""")
        now = time.time()
        conn.execute(
            "INSERT INTO sagaline_sagas (saga_id, name, status, input, fingerprint, "
            "created_at, updated_at, finished_at, version) VALUES "
            "(%s, 'bench.web.big', 'COMPLETED', '{}', 'web', %s, %s, %s, 1)",
            (BIG, now - 60, now, now),
        )
        conn.cursor().executemany(
            "INSERT INTO sagaline_steps (saga_id, name, position, status, attempt, "
            "comp_attempt, output, has_compensation_data, started_at, finished_at, version) "
            "VALUES (%s, %s, %s, 'SUCCEEDED', 5, 0, '{\"ok\": true}', FALSE, %s, %s, 1)",
            [
                (BIG, f"step_{k:02d}", k, now - 60 + k * 0.9, now - 60 + k * 0.9 + 0.5)
                for k in range(64)
            ],
        )
        events: list[tuple[Any, ...]] = [(BIG, now - 60, "saga_started", None, None, None, None)]
        for k in range(64):
            for att in range(1, 6):
                ts = now - 60 + k * 0.9 + att * 0.1
                step = f"step_{k:02d}"
                events.append((BIG, ts, "step_dispatched", step, att, "forward", None))
                events.append((BIG, ts + 0.01, "step_started", step, att, "forward", None))
                end = "step_succeeded" if att == 5 else "step_attempt_failed"
                detail = (
                    None
                    if att == 5
                    else json.dumps(
                        {
                            "error": "ConnectionError: flaky\nTraceback (most recent call last):\n"
                            "  ...\nConnectionError: flaky"
                        }
                    )
                )
                events.append((BIG, ts + 0.05, end, step, att, "forward", detail))
        events += [
            (BIG, now - 1 + i * 0.001, "step_redispatched", "step_63", 5, "forward", None)
            for i in range(1000 - len(events) - 1)
        ]
        events.append((BIG, now, "saga_completed", None, None, None, None))
        conn.cursor().executemany(
            "INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            events,
        )
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("sagaline_sagas", "sagaline_steps", "sagaline_events"):
            conn.execute(f"VACUUM (ANALYZE) {table}")


def cpu_seconds(pid: int) -> float | None:
    """The user + system CPU time a process has used (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    client: httpx.Client, path: str, params: dict[str, Any], rounds: int, server: int
) -> dict[str, Any]:
    client.get(path, params=params)  # warm
    ms = []
    cpu_before = cpu_seconds(server)
    for _ in range(rounds):
        started = time.perf_counter()
        r = client.get(path, params=params)
        ms.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} {params}: {r.status_code} {r.text[:200]}")
    cpu_after = cpu_seconds(server)
    ms.sort()
    return {
        "path": path,
        "params": params,
        "requests": rounds,
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
        # The server's CPU time per request: what the wall-clock figures cost without
        # the waits of a busy machine (other processes' turns on the CPUs).
        "server_cpu_ms": None
        if cpu_before is None or cpu_after is None
        else round((cpu_after - cpu_before) * 1000 / rounds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    p.add_argument("--sagas", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    url = shared_postgres_url(f"sagaline_bench_web_{uuid.uuid4().hex[:8]}")
    server = None
    try:
        log(f"loading {args.sagas} sagas")
        started = time.monotonic()
        load(url, args.sagas)
        log(f"loaded in {time.monotonic() - started:.0f} s")
        port = free_port()
        env = {
            **os.environ,
            "SAGALINE_STORE_URL": url,
            "SAGALINE_WEB_TOKEN": "",
            "SAGALINE_WEB_READ_TOKEN": "",
        }
        server = subprocess.Popen(
            [SAGALINE, "web", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(300):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            first = client.get("/api/v1/sagas", params={"limit": 50}).json()
            cases: list[tuple[str, dict[str, Any]]] = [
                ("/api/v1/sagas", {"limit": 50}),
                ("/api/v1/sagas", {"limit": 50, "status": "COMPENSATED"}),
                ("/api/v1/sagas", {"limit": 50, "status": "FAILED", "name": "bench.web.1"}),
                ("/api/v1/sagas", {"limit": 50, "page_token": first["next_page_token"]}),
                ("/", {}),
                ("/", {"status": "FAILED"}),
                (f"/api/v1/sagas/{BIG}", {}),
                # What the page's "show earlier events" reads: 200 events, newest first.
                (f"/api/v1/sagas/{BIG}/events", {"before_seq": 2**62, "limit": 200}),
                (f"/sagas/{BIG}", {}),
            ]
            for path, params in cases:
                figure = timed(client, path, params, args.rounds, server.pid)
                print(json.dumps({"figure": "WEB", "sagas": args.sagas, **figure}), flush=True)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
