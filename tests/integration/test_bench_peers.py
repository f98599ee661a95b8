"""`python -m bench --peers`: DBOS and celery-saga measured beside sagaline, and cleaned up.

Benchmarks are not tests: nothing here looks at how fast anything was, only that
every peer's figure is there with a ratio, that a missing peer is named with the
extra that installs it, and that a signal stops the peers' processes too.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.peers import EXTRA, missing_peers
from tests.harness import (
    REPO_ROOT,
    SHARED_PG_HOST,
    SHARED_PG_PORT,
    SHARED_PG_USER,
    pid_alive,
)
from tests.integration.test_bench_signals import (
    STOP_BOUND,
    BenchRun,
    cmdline,
    descendants,
    parent,
)

RUN_TIMEOUT = 300.0  # seconds for a whole `--quick --peers` run
STARTUP_TIMEOUT = 180.0  # seconds until the DBOS executors are up (after sagaline's figures)

needs_peers = pytest.mark.skipif(
    bool(missing_peers()), reason=f"{missing_peers()} not installed: pip install -e '.[{EXTRA}]'"
)


def database_exists(name: str) -> bool:
    import psycopg

    with psycopg.connect(
        host=SHARED_PG_HOST,
        port=SHARED_PG_PORT,
        user=SHARED_PG_USER,
        dbname="postgres",
        connect_timeout=10,
    ) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def dbos_database(stderr: str) -> str:
    found = re.search(r"\[dbos\] system database (\S+)", stderr)
    assert found, f"the run names DBOS's database:\n{stderr[-3000:]}"
    return found.group(1)


def peer_lines(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            if "peer" in data:
                found[(data["peer"], data["figure"])] = data
    return found


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@needs_peers
def test_peers_run_beside_sagaline_and_the_report_gives_each_a_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--peers", "--only", "L1,T1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = peer_lines(proc.stdout)
    assert set(lines) == {(p, f) for p in ("dbos", "celery-saga") for f in ("L1", "T1")}
    assert lines[("dbos", "L1")]["store"] == "postgres"
    assert lines[("celery-saga", "L1")]["store"] == "redis"
    assert lines[("dbos", "T1")]["settings"]["executors"] == 2
    # Every workflow of the batch ran on one of the two executors that share the queue.
    split = lines[("dbos", "T1")]["workflows_per_executor"]
    assert set(split) <= {"bench-dbos-1", "bench-dbos-2"}
    assert sum(split.values()) == lines[("dbos", "T1")]["sagas"]
    for (peer, figure), line in lines.items():
        keys = (
            ["peer_median_ms", "peer_p95_ms", "baseline_median_ms", "ratio_median"]
            if figure == "L1"
            else ["sagas", "peer_per_s", "baseline_per_s", "ratio_throughput"]
        )
        for key in keys:
            assert positive(line[key]), f"{peer} {figure}.{key} = {line[key]!r}"
    # The table puts every system's ratios in one place: ours and the peers'.
    rows = {
        row.split("│")[1].strip(): row for row in proc.stdout.splitlines() if row.startswith("│")
    }
    ratio = re.compile(r"\d+\.\d\dx")
    for system in (
        "sagaline",
        lines[("dbos", "L1")]["system"],
        lines[("celery-saga", "L1")]["system"],
    ):
        assert system in rows, f"no row for {system}:\n{proc.stdout}"
        assert len(ratio.findall(rows[system])) == 2, rows[system]
    assert not database_exists(dbos_database(proc.stderr))


@pytest.mark.parametrize("blocked", [["dbos"], ["dbos", "celery_saga"]])
def test_peers_missing_exit_naming_the_package_and_the_extra(
    blocked: list[str], tmp_path: Path
) -> None:
    if "celery_saga" not in blocked and "celery-saga" in missing_peers():
        pytest.skip("celery-saga is not installed here: the message would name it too")
    # How Python marks a module as absent: `import` and find_spec both fail on None.
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "from bench.__main__ import main\nsys.exit(main(['--peers', '--quick']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    named = (
        "dbos is not installed"
        if blocked == ["dbos"]
        else ("dbos and celery-saga are not installed")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert named in proc.stderr
    assert f"pip install -e '.[{EXTRA}]'" in proc.stderr
    assert proc.stdout == ""
    assert "redis-server ready" not in proc.stderr  # refused before anything started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--peers", "--only", "L2"],
            "--peers measures ('L1', 'T1'): include one in --only",
            marks=needs_peers,
        ),
        (
            ["--peers", "--dbos-polling-interval", "0"],
            "--dbos-polling-interval 0: a number of seconds above 0, with --peers",
        ),
        (
            ["--dbos-polling-interval", "0.1"],
            "--dbos-polling-interval 0.1: a number of seconds above 0, with --peers",
        ),
        (["--t1-sagas", "0"], "--t1-sagas must be at least 1, not 0"),
    ],
)
def test_bad_peer_options_are_refused_before_anything_starts(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "redis-server ready" not in proc.stderr


def peer_processes(bench: int, log: Path) -> dict[str, list[int]] | None:
    """The run's redis-server, plain worker (+ pool) and both DBOS executors, once all up."""
    text = log.read_text()
    if "executor bench-dbos-2 ready" not in text:
        return None
    procs = descendants(bench)
    executors = [p for p in procs if parent(p) == bench and "bench.peer_dbos" in cmdline(p)]
    workers = [p for p in procs if parent(p) == bench and "celery" in cmdline(p)]
    pools = [p for p in procs if parent(p) in workers]
    redis_servers = [p for p in procs if "redis-server" in cmdline(p)]
    if len(executors) != 2 or len(redis_servers) != 1 or not workers:
        return None
    return {"dbos": executors, "workers": workers, "pool": pools, "redis-server": redis_servers}


@needs_peers
def test_sigterm_during_the_peers_stops_their_processes_and_drops_their_database(
    tmp_path: Path,
) -> None:
    # A T1 batch long enough for the signal to find the DBOS executors at work.
    args = ["--quick", "--peers", "--only", "T1", "--t1-sagas", "300"]
    with BenchRun(args, tmp_path / "bench.err") as bench:
        pids = bench.wait_up(
            lambda pid: peer_processes(pid, bench.log),
            timeout=STARTUP_TIMEOUT,
            what="the benchmark's DBOS executors",
        )
        code, elapsed = bench.interrupt(signal.SIGTERM, pids)

        assert code == 128 + signal.SIGTERM, f"exit status {code}:\n{bench.stderr()[-3000:]}"
        assert [p for p in pids if pid_alive(p)] == []
        assert elapsed < STOP_BOUND
        assert not database_exists(dbos_database(bench.stderr()))
