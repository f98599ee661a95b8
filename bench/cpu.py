"""CPU time spent by a worker's processes and by the caller: far less sensitive to the
machine's load than wall-clock figures (another process's work delays a saga, but does
not add to the CPU time its processes use).

Read from each process's CPU-time clock and /proc (Linux): its user + system time, plus
that of its children it has reaped (a pool process that exited counts in its parent).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> tuple[float, float] | None:
    """Seconds of user and of system CPU of `pid` (all its threads, also those that
    ended) and of its reaped children; None if it is gone.

    The total comes from the process's CPU-time clock, in nanoseconds; /proc's figures
    are in clock ticks (10 ms), coarser than a 4-step saga, and give the system share."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    fields = text.rpartition(")")[2].split()
    # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] is field 3.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    system = (stime + cstime) / _TICK
    total = _clock_seconds(pid)
    if total is None:
        return (utime + cutime) / _TICK, system
    return max(0.0, total + (cutime + cstime) / _TICK - system), system


def _clock_seconds(pid: int) -> float | None:
    """The CPU-time clock of process `pid` (Linux: clock_getcpuclockid(3), which the
    standard library does not wrap, makes this clock id)."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except (OSError, OverflowError):
        return None


def snapshot(pids: Iterable[int]) -> dict[int, tuple[float, float]]:
    found = {}
    for pid in pids:
        cpu = process_cpu(pid)
        if cpu is not None:
            found[pid] = cpu
    return found


class CpuMeter:
    """Adds up the CPU seconds of the processes `pids()` names while `measure` runs a
    callable, and of this process (the caller, all its threads) while `caller` runs one:
    what starting the sagas costs, without the polling that waits for them."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids
        self.worker_user_s = 0.0
        self.worker_system_s = 0.0
        self.caller_s = 0.0

    def caller(self, fn: Callable[[], Any]) -> Any:
        started = time.process_time()
        try:
            return fn()
        finally:
            self.caller_s += time.process_time() - started

    def measure(self, fn: Callable[[], Any]) -> Any:
        before = snapshot(self.pids())
        try:
            return fn()
        finally:
            after = snapshot(set(before) | set(self.pids()))
            # A process that appeared meanwhile (a replaced pool process) started at zero;
            # one that is gone took its time with it, except what its parent reaped.
            for pid, (user, system) in after.items():
                user_before, system_before = before.get(pid, (0.0, 0.0))
                self.worker_user_s += user - user_before
                self.worker_system_s += system - system_before

    @property
    def worker_s(self) -> float:
        return self.worker_user_s + self.worker_system_s

    def per_saga_ms(self, sagas: int) -> dict[str, float]:
        n = max(sagas, 1)
        return {
            "worker_ms": round(self.worker_s * 1000 / n, 3),
            "worker_system_ms": round(self.worker_system_s * 1000 / n, 3),
            "caller_ms": round(self.caller_s * 1000 / n, 3),
            "total_ms": round((self.worker_s + self.caller_s) * 1000 / n, 3),
        }
