"""bench/cpu.py: the CPU time of other processes, finer than /proc's clock ticks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.cpu import CpuMeter, process_cpu

# Spins on two threads (one of which ends), then sleeps until killed.
SPIN = """
import threading, time
def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
worker = threading.Thread(target=spin, args=(0.15,))
worker.start()
worker.join()
spin(0.15)
print("spun", flush=True)
time.sleep(60)
"""


@pytest.fixture
def spinner():
    proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spun"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_counts_every_thread_of_another_process_also_one_that_ended(spinner):
    cpu = process_cpu(spinner.pid)
    assert cpu is not None
    user, system = cpu
    # 0.3 s of spinning plus the interpreter's start; /proc alone would give whole ticks.
    total = user + system
    assert 0.3 <= total < 3.0
    assert system >= 0.0
    # Read from the process's clock, in nanoseconds: not a whole number of ticks.
    assert abs(total * 100 - round(total * 100)) > 1e-6


def test_an_idle_process_adds_nothing_and_a_gone_one_is_none(spinner):
    meter = CpuMeter(lambda: [spinner.pid])
    meter.measure(lambda: time.sleep(0.2))
    # Sleeping: far less than one 10 ms tick, which /proc would round up or down to.
    assert 0.0 <= meter.worker_s < 0.005
    spinner.kill()
    spinner.wait(timeout=10)
    assert process_cpu(spinner.pid) is None
