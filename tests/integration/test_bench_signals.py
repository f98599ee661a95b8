"""SIGTERM or Ctrl-C stops `python -m bench` and every process it started, and it exits non-zero.

The processes are found from the outside, in /proc, as descendants of the benchmark:
its private redis-server, its two Celery workers and their pool processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, HarnessError, pid_alive, wait_until

STARTUP_TIMEOUT = 120.0  # seconds until the redis-server and both workers are up
STOP_BOUND = 30.0  # seconds from the signal until every process is gone


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]), fields[0]


def descendants(root: int) -> set[int]:
    """Live (not zombie) processes under `root`, at any depth."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] not in ("Z", "X"):
                children.setdefault(st[0], []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    for _ in range(10_000):
        if not todo:
            break
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[0]


def started_processes(bench: int) -> dict[str, list[int]] | None:
    """The benchmark's redis-server, worker main processes and pool processes, once all run."""
    procs = descendants(bench)
    redis_servers = [p for p in procs if "redis-server" in cmdline(p)]
    workers = [p for p in procs if parent(p) == bench and "celery" in cmdline(p)]
    pools = [p for p in procs if parent(p) in workers]
    if len(redis_servers) != 1 or len(workers) != 2 or len(pools) != 4:
        return None
    return {"redis-server": redis_servers, "workers": workers, "pool": pools}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_the_benchmark_started(
        sig: signal.Signals, tmp_path: Path) -> None:
    log = tmp_path / "bench.err"
    with open(log, "wb") as err:
        bench = subprocess.Popen([sys.executable, "-m", "bench", "--quick"], cwd=REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    seen: dict[str, list[int]] = {}
    try:
        def all_up() -> bool:
            if bench.poll() is not None:
                raise HarnessError(f"bench exited early ({bench.returncode}):\n"
                                   f"{log.read_text()[-3000:]}")
            found = started_processes(bench.pid)
            # Up, and announced: the bench logs a worker's pid once it is ready.
            if found and all(str(w) in log.read_text() for w in found["workers"]):
                seen.update(found)
            return bool(seen)

        wait_until(all_up, timeout=STARTUP_TIMEOUT, interval=0.1,
                   what="the benchmark's redis-server, 2 workers and 4 pool processes")
        pids = [p for group in seen.values() for p in group]
        assert bench.poll() is None, "the benchmark ended before it could be interrupted"

        bench.send_signal(sig)
        signalled = time.monotonic()
        code = bench.wait(timeout=STOP_BOUND)
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=STOP_BOUND,
                   interval=0.05, what=f"processes {pids} to exit")
        elapsed = time.monotonic() - signalled

        assert code == 128 + sig, f"exit status {code}:\n{log.read_text()[-3000:]}"
        assert [p for p in pids if pid_alive(p)] == []
        assert elapsed < STOP_BOUND
        assert f"{sig.name}: stopping every process this run started" in log.read_text()
    finally:
        # Whatever failed above, leave nothing running: the bench, then what it started.
        left = {p for group in seen.values() for p in group}
        if bench.poll() is None:
            left |= descendants(bench.pid)
            bench.terminate()
            try:
                bench.wait(timeout=STOP_BOUND + 10)
            except subprocess.TimeoutExpired:
                bench.kill()
                bench.wait(timeout=10)
        for p in left:
            if pid_alive(p):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
