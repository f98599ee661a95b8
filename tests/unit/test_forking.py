"""A pool process forked while a thread of the worker's main process holds one of
sagaline's locks (opening the store, the store's first schema check) finds it free
(forking.child_safe_lock): it must not wait for a thread that does not exist there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

import sagaline
from sagaline.stores.sql import SQLStore


def test_a_child_forked_while_a_thread_holds_sagalines_locks_goes_on(tmp_path: Path) -> None:
    runtime = sagaline.init_app(
        Celery("fork_locks", broker="memory://", set_as_current=False),
        store=f"sqlite:///{tmp_path}/state.db",
        sweeper=False,
    )
    store = runtime.store
    assert isinstance(store, SQLStore)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # as the store gauges of /metrics would, mid-read
        with runtime._lock, store._migrate_lock:
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: a pool process's first use of the store
            signal.alarm(10)  # stuck: killed by SIGALRM
            try:
                os._exit(0 if runtime.store.get_saga("not-there") is None else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join(5)
    assert not os.WIFSIGNALED(status), f"the child hung: {signal.Signals(os.WTERMSIG(status))}"
    assert os.WEXITSTATUS(status) == 0  # it read the store: no such saga


def test_a_metric_write_does_not_wait_for_the_sweepers_work() -> None:
    # The sweeper holds fork_guard() through its store work (seconds in an outage); a
    # metric written meanwhile by another thread (the outbox relay's) waits only for
    # metrics_guard(), which a fork takes after fork_guard().
    pytest.importorskip("prometheus_client")
    from sagaline.forking import fork_guard
    from sagaline.outbox import metrics as outbox_metrics

    holding, release = threading.Event(), threading.Event()

    def sweep() -> None:
        with fork_guard():
            holding.set()
            release.wait(30)

    sweeper = threading.Thread(target=sweep, daemon=True)
    sweeper.start()
    assert holding.wait(5)
    wrote = threading.Event()

    def relay() -> None:
        outbox_metrics.sent("fork-test", time.time(), None)
        wrote.set()

    try:
        threading.Thread(target=relay, daemon=True).start()
        assert wrote.wait(5), "the metric write waited for fork_guard()"
    finally:
        release.set()
        sweeper.join(5)


WORKER_METRICS = """
import sys
from celery import Celery
import sagaline
from sagaline.observability import metrics
from sagaline.testing import free_port

port = free_port()
runtime = sagaline.init_app(Celery("m"), store=sys.argv[1], sweeper=False, metrics_port=port)
assert runtime._store is None
served = metrics.WorkerMetrics(runtime, port)
served.start()  # as a worker's main thread does at worker_init, before its pool forks
print(type(runtime._store).__name__)
served.stop()
"""


def test_a_workers_metrics_make_the_store_before_the_pool_forks() -> None:
    # Else the store gauges' thread makes it at the first scrape, importing its driver
    # while the pool may fork. Making it connects to nothing: a store that is down
    # (nothing listens on port 1) does not stop /metrics.
    pytest.importorskip("prometheus_client")
    out = subprocess.run(
        [sys.executable, "-c", WORKER_METRICS, "postgresql://nobody@127.0.0.1:1/down"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["SQLStore"], out.stderr
