"""Prometheus metrics (`pip install 'sagaline[prometheus]'`): counters fed by sagaline's
signals, gauges read from the store at scrape time, `/metrics` served by every worker.

A worker's pool processes each write their own sample files (prometheus-client's
multiprocess mode, in a directory of this worker's own); the worker's main process
serves their sum. A pool process that dies leaves its counter files behind, so a
counter never goes down when Celery replaces a process. Outside a worker (a web
process that starts sagas) the same metrics go to prometheus-client's default
registry, for the application to expose as it exposes its own. The collectors a
worker's registry runs at each scrape (the store gauges, the sweep of dead pool
processes) are in `collectors`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_shutdown

from .. import signals
from ..exceptions import ConfigurationError
from ..forking import child_safe_lock, metrics_guard
from .collectors import GAUGE_TTL as GAUGE_TTL
from .collectors import GAUGE_WAIT as GAUGE_WAIT
from .collectors import IN_PROGRESS as IN_PROGRESS
from .collectors import PAST_DEADLINE_CAP as PAST_DEADLINE_CAP
from .collectors import DeadProcessSweep
from .collectors import StoreGauges as StoreGauges
from .collectors import read_gauges as read_gauges

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..stores.base import Store

log = logging.getLogger("sagaline")

# Saga durations run from milliseconds to hours; a step's queue wait can reach the
# half hour of an outage (runtime-sized buckets that stop at 10 s would hide it).
# fmt: off
SAGA_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, float("inf"),
)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))
WAIT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
    float("inf"),
)
STORE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"),
)
# fmt: on
# The store operations that are timed (sagaline_store_operation_seconds{operation}).
STORE_OPERATIONS = (
    "create_saga",
    "claim_step",
    "renew_lease",
    "transact",
    "read_state",
    "get_saga",
    "history",
    "list_sagas",
    "count_by_status",
    "find_due",
    "find_claimed",
    "gc",
)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "metrics_port (SAGALINE_METRICS_PORT) needs prometheus-client, which is not "
            "installed: pip install 'sagaline[prometheus]'"
        ) from None
    return prometheus_client


class SagaMetrics:
    """The counters and histograms of one process."""

    def __init__(self, registry: Any) -> None:
        pc = _prometheus()
        kw = {"registry": registry}
        # The child of each label set, once looked up: `labels()` takes a lock and checks
        # its arguments every time, several times per attempt. Label values are few
        # (saga and step names, phases, outcomes), so the cache stays small.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.started = pc.Counter("sagaline_sagas_started", "Sagas started.", ["saga"], **kw)
        self.finished = pc.Counter(
            "sagaline_sagas_finished",
            "Sagas that reached a terminal status.",
            ["saga", "status"],
            **kw,
        )
        self.duration = pc.Histogram(
            "sagaline_saga_duration_seconds",
            "From run() to the terminal status.",
            ["saga", "status"],
            buckets=SAGA_BUCKETS,
            **kw,
        )
        self.attempts = pc.Counter(
            "sagaline_step_attempts",
            "Step and compensation attempts run, by outcome.",
            ["saga", "step", "phase", "outcome"],
            **kw,
        )
        self.step_duration = pc.Histogram(
            "sagaline_step_duration_seconds",
            "Run time of one attempt's body.",
            ["saga", "step", "phase"],
            buckets=STEP_BUCKETS,
            **kw,
        )
        self.queue_wait = pc.Histogram(
            "sagaline_step_queue_wait_seconds",
            "From a step's dispatch (a retry: the end of its backoff) to its claim.",
            ["saga", "step"],
            buckets=WAIT_BUCKETS,
            **kw,
        )
        self.compensations = pc.Counter(
            "sagaline_compensations",
            "Compensation attempts, by outcome.",
            ["saga", "step", "outcome"],
            **kw,
        )
        self.repairs = pc.Counter(
            "sagaline_sweeper_repairs", "What the sweeper repaired, by kind.", ["kind"], **kw
        )
        self.retention = pc.Counter(
            "sagaline_retention_deleted_sagas",
            "Finished sagas deleted by retention, by status.",
            ["status"],
            **kw,
        )
        self.store_op = pc.Histogram(
            "sagaline_store_operation_seconds",
            "Time of one store operation (retries included).",
            ["operation"],
            buckets=STORE_BUCKETS,
            **kw,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_metrics: SagaMetrics | None = None
_lock = child_safe_lock()
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _this_process() -> int:
    """This process's id, without a system call (a forked child updates it at once)."""
    return _pid[0]


def current() -> SagaMetrics:
    """This process's metrics; created in the default registry outside a worker."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = SagaMetrics(_prometheus().REGISTRY)
    return _metrics


# -- recording: signal receivers ------------------------------------------------------------


def _on_saga_started(sender: Any = None, name: str = "", **_: Any) -> None:
    m = current()
    m.child(m.started, name).inc()


def _on_saga_finished(
    sender: Any = None, name: str = "", status: Any = None, duration: float = 0.0, **_: Any
) -> None:
    label = str(status).lower()
    m = current()
    m.child(m.finished, name, label).inc()
    m.child(m.duration, name, label).observe(max(0.0, duration))


def _on_step_started(
    sender: Any = None, name: str = "", step: str = "", queue_wait: float | None = None, **_: Any
) -> None:
    if queue_wait is not None:
        m = current()
        m.child(m.queue_wait, name, step).observe(max(0.0, queue_wait))


def _on_step_finished(
    sender: Any = None,
    name: str = "",
    step: str = "",
    phase: Any = None,
    outcome: str = "",
    duration: float = 0.0,
    **_: Any,
) -> None:
    m = current()
    phase_label = str(phase)
    m.child(m.attempts, name, step, phase_label, outcome).inc()
    m.child(m.step_duration, name, step, phase_label).observe(max(0.0, duration))
    if phase_label == "compensate":
        m.child(m.compensations, name, step, outcome).inc()


def _on_sweeper_repaired(
    sender: Any = None, counts: dict[Any, int] | None = None, **_: Any
) -> None:
    m = current()
    for kind, count in (counts or {}).items():
        if count:
            m.child(m.repairs, str(getattr(kind, "value", kind))).inc(count)


def _on_retention_deleted(
    sender: Any = None, by_status: dict[str, int] | None = None, **_: Any
) -> None:
    for status, count in (by_status or {}).items():
        if count:
            current().retention.labels(str(status).lower()).inc(count)


def _guarded(receiver: Callable[..., None]) -> Callable[..., None]:
    """`receiver` run under `metrics_guard()`. prometheus-client's locks (in multiprocess
    mode one lock for every value of the process) are taken by the threads of a
    worker's main process too (the sweeper, the outbox relay, /metrics); a pool child
    forked while one of them held it would hang at its first metric, with its messages
    (prometheus/client_python#431). A fork waits until no metric is being written."""

    @functools.wraps(receiver)
    def guarded(*args: Any, **kwargs: Any) -> None:
        with metrics_guard():
            receiver(*args, **kwargs)

    return guarded


_RECEIVERS: tuple[tuple[Any, Callable[..., None]], ...] = tuple(
    (signal, _guarded(receiver))
    for signal, receiver in (
        (signals.saga_started, _on_saga_started),
        (signals.saga_finished, _on_saga_finished),
        (signals.step_started, _on_step_started),
        (signals.step_finished, _on_step_finished),
        (signals.sweeper_repaired, _on_sweeper_repaired),
        (signals.retention_deleted, _on_retention_deleted),
    )
)


def instrument_store(store: Store) -> None:
    """Time the store's operations (once per store object; forked children share it)."""
    if getattr(store, "_sagaline_timed", False):
        return
    for op in STORE_OPERATIONS:
        setattr(store, op, _timed(op, getattr(store, op)))
    store._sagaline_timed = True  # type: ignore[attr-defined]


def _timed(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    # The histogram child of this operation, for the process's current metrics (a worker
    # replaces them before its pool forks).
    resolved: list[Any] = [None, None]

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            with metrics_guard():  # see _guarded
                m = _metrics if _metrics is not None else current()
                if resolved[0] is not m:
                    resolved[:] = [m, m.store_op.labels(op)]
                resolved[1].observe(elapsed)

    return timed


# -- a worker's /metrics ---------------------------------------------------------------


class WorkerMetrics:
    """The multiprocess directory and the HTTP server of one worker's main process."""

    def __init__(self, runtime: Runtime, port: int, addr: str = "0.0.0.0") -> None:
        self.runtime = runtime
        self.port = port
        self.addr = addr
        self.directory: str | None = None
        self.server: Any = None

    def start(self) -> None:
        """In the worker's main process, before its pool forks."""
        global _metrics
        pc = _prometheus()
        from prometheus_client import values
        from prometheus_client.multiprocess import MultiProcessCollector

        # A directory of this worker's own: two workers of one machine never mix samples.
        base = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.directory = tempfile.mkdtemp(prefix="sagaline-metrics-", dir=base)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory  # the pool inherits it
        # prometheus-client picks its value class when first imported; pick again now
        # that the directory is set (metrics created from here on write sample files).
        # Its default asks the kernel for the pid at every increment, to notice a fork;
        # this process's pid, kept up to date at each fork, tells the same.
        values.ValueClass = values.MultiProcessValue(_this_process)  # type: ignore[no-untyped-call]
        with _lock:
            _metrics = SagaMetrics(registry=None)  # read back through the files
        registry = pc.CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        registry.register(StoreGauges(lambda: self.runtime.store))
        registry.register(DeadProcessSweep(self.directory))
        # The store object is made here, in the main thread before the pool forks,
        # which imports its driver; not in the gauges' thread at the first scrape,
        # where a fork in the middle of an import would leave the child waiting on
        # that module's lock (forking.py). Making it opens no connection: /metrics is
        # served even while the store is down.
        self.runtime.store  # noqa: B018
        try:
            self.server = pc.start_http_server(self.port, addr=self.addr, registry=registry)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {self.addr}:{self.port}: {exc}"
            ) from None
        log.info("sagaline metrics on http://%s:%s/metrics", self.addr, self.port)

    def stop(self) -> None:
        server = self.server[0] if isinstance(self.server, tuple) else self.server
        if server is not None:
            with contextlib.suppress(Exception):
                server.shutdown()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def install(runtime: Runtime, port: int) -> None:
    """Record sagaline's metrics in this process; serve them on `port` if it is a worker.

    Called by `init_app` when `metrics_port` is set. Fails at once, naming the extra,
    when prometheus-client is missing.
    """
    _prometheus()
    if not 0 < port < 65536:
        raise ConfigurationError(f"metrics_port must be a TCP port (1-65535), got {port}")
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"sagaline.metrics.{signal.name}")
    runtime.store_hooks.append(instrument_store)
    if runtime._store is not None:  # a Store object given to init_app
        instrument_store(runtime._store)
    app = runtime.app
    served: list[WorkerMetrics] = []

    def start_serving(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app or served:
            return
        worker_metrics = WorkerMetrics(runtime, port)
        worker_metrics.start()
        served.append(worker_metrics)

    def stop_serving(sender: Any = None, **_: Any) -> None:
        while served:
            served.pop().stop()

    worker_init.connect(start_serving, weak=False, dispatch_uid=f"sagaline.metrics.{id(app)}")
    worker_shutdown.connect(
        stop_serving, weak=False, dispatch_uid=f"sagaline.metrics.stop.{id(app)}"
    )
