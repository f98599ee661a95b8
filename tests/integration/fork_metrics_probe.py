"""Forks while a thread writes sagaline's metrics, as a worker's pool forks (at start,
and to replace a process) while the threads of its main process write them: the outbox
relay its counters, the store gauges of /metrics the timings of their store reads.
Each child writes the same metrics once, within a deadline. Prints one JSON line: how
many children hung, and what the worker's /metrics would sum against what was written.

    python -m tests.integration.fork_metrics_probe FORKS
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from celery import Celery
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

import sagaline
from sagaline.observability import metrics
from sagaline.outbox import metrics as outbox_metrics
from sagaline.stores.base import Store
from sagaline.stores.memory import MemoryStore
from sagaline.testing import free_port

CHILD_DEADLINE = 3  # seconds: a child that has not written by then is stuck


def write(store: Store) -> None:
    """What a pool process writes: an outbox event sent, a store operation timed."""
    outbox_metrics.sent("probe-destination", time.time(), None)
    store.get_saga("probe")  # timed by sagaline_store_operation_seconds


def main() -> None:
    forks = int(sys.argv[1])
    port = free_port()
    runtime = sagaline.init_app(Celery("probe"), store="memory://", metrics_port=port)
    served = metrics.WorkerMetrics(runtime, port)
    served.start()  # as a worker's main process does before its pool forks
    store = runtime.store

    written = [0]
    stop = threading.Event()

    def writer() -> None:  # as the relay and the store gauges of /metrics write
        own = MemoryStore()  # a store of this thread's own, its operations timed
        metrics.instrument_store(own)
        while not stop.is_set():
            outbox_metrics.sent("probe-destination", time.time(), None)
            own.get_saga("probe")
            written[0] += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.05)
    hung = 0
    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            signal.alarm(CHILD_DEADLINE)
            write(store)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            hung += 1
    stop.set()
    thread.join(10)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=served.directory)
    report = {
        "hung": hung,
        "written": written[0],
        "published": registry.get_sample_value(
            "sagaline_outbox_published_total", {"destination": "probe-destination"}
        ),
        "timed": registry.get_sample_value(
            "sagaline_store_operation_seconds_count", {"operation": "get_saga"}
        ),
    }
    served.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
