"""DBOS's side of `python -m bench --peers`: one executor process of the 4-step workflow.

`python -m bench.peer_dbos` launches DBOS on the system database in
``BENCH_DBOS_URL`` (PostgreSQL), registers the queue ``bench_peers`` and runs the
workflows enqueued on it, until SIGTERM or SIGINT; then it destroys DBOS and exits 0.
The benchmark starts two of these, each with its own executor id
(``BENCH_DBOS_EXECUTOR``), so that the two processes share the queue's work as two
Celery pool processes share sagaline's. It touches ``$SAGALINE_READY_FILE`` once
launched, as a Celery worker of the benchmark does.

The workflow is the benchmark's no-op saga: 4 steps that do nothing, each recorded
by DBOS as a step of the workflow.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from dbos import DBOS, DBOSConfig

APP_NAME = "sagaline-bench-peers"
QUEUE = "bench_peers"
WORKFLOW = "bench.noop4"
STEPS = 4
RUN_FOR = 24 * 3600.0  # seconds: longer than any benchmark run; the benchmark stops us sooner


def config() -> DBOSConfig:
    return {
        "name": APP_NAME,
        "system_database_url": os.environ["BENCH_DBOS_URL"],
        "executor_id": os.environ.get("BENCH_DBOS_EXECUTOR", "bench-dbos"),
        # Both executors run the same code: one version, so either may dequeue any workflow.
        "application_version": "bench",
        "log_level": os.environ.get("BENCH_DBOS_LOG_LEVEL", "WARNING"),
    }


@DBOS.step(name="bench.noop")
def noop() -> None:
    return None


@DBOS.workflow(name=WORKFLOW)
def noop4() -> None:
    for _ in range(STEPS):
        noop()


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    DBOS(config=config())
    try:
        DBOS.launch()
        DBOS.register_queue(
            QUEUE,
            on_conflict="always_update",
            polling_interval_sec=float(os.environ.get("BENCH_DBOS_POLL", "0.05")),
        )
        ready = os.environ.get("SAGALINE_READY_FILE")
        if ready:
            Path(ready).touch()
        print(
            f"executor {os.environ.get('BENCH_DBOS_EXECUTOR')} ready (pid {os.getpid()})",
            flush=True,
        )
        stop.wait(RUN_FOR)
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
