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
from collections.abc import Callable, Sequence
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


class BenchRun:
    """`python -m bench <args>`, its stderr in `log`. Leaving the `with` block leaves
    nothing of it running, whatever failed: the bench, then every process it was seen with."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench", *args],
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.seen: dict[str, list[int]] = {}

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(
        self, find: Callable[[int], dict[str, list[int]] | None], *, timeout: float, what: str
    ) -> list[int]:
        """The pids `find(bench pid)` returns once it returns any (bounded by `timeout`)."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"bench exited early ({self.proc.returncode}):\n{self.stderr()[-3000:]}"
                )
            found = find(self.proc.pid)
            if found:
                self.seen.update(found)
            return bool(self.seen)

        wait_until(up, timeout=timeout, interval=0.1, what=what)
        assert self.proc.poll() is None, "the benchmark ended before it could be interrupted"
        return [p for group in self.seen.values() for p in group]

    def interrupt(self, sig: signal.Signals, pids: Sequence[int]) -> tuple[int, float]:
        """Send `sig`; the exit status and the seconds until the bench and `pids` were gone."""
        self.proc.send_signal(sig)
        signalled = time.monotonic()
        code = self.proc.wait(timeout=STOP_BOUND)
        wait_until(
            lambda: not any(pid_alive(p) for p in pids),
            timeout=STOP_BOUND,
            interval=0.05,
            what=f"processes {list(pids)} to exit",
        )
        return code, time.monotonic() - signalled

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        left = {p for group in self.seen.values() for p in group}
        if self.proc.poll() is None:
            left |= descendants(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_BOUND + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for p in left:
            if pid_alive(p):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_the_benchmark_started(
    sig: signal.Signals, tmp_path: Path
) -> None:
    with BenchRun(["--quick"], tmp_path / "bench.err") as bench:

        def announced(pid: int) -> dict[str, list[int]] | None:
            found = started_processes(pid)
            # Up, and announced: the bench logs a worker's pid once it is ready.
            if found and all(str(w) in bench.stderr() for w in found["workers"]):
                return found
            return None

        pids = bench.wait_up(
            announced,
            timeout=STARTUP_TIMEOUT,
            what="the benchmark's redis-server, 2 workers and 4 pool processes",
        )
        code, elapsed = bench.interrupt(sig, pids)

        assert code == 128 + sig, f"exit status {code}:\n{bench.stderr()[-3000:]}"
        assert [p for p in pids if pid_alive(p)] == []
        assert elapsed < STOP_BOUND
        assert f"{sig.name}: stopping every process this run started" in bench.stderr()
