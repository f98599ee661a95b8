"""`init_app(app)`: wires sagaline into a Celery app through Celery's own extension points.

- Step execution: a `task_annotations` entry wraps every task's `__call__`
  (Celery's documented `@__call__` annotation); a message without sagaline's
  header runs untouched, a saga step is claimed before and completed after.
- Recovery: a worker bootstep runs the sweeper in every `celery worker`; its thread
  also hands back, without waiting for their leases, the claims of this worker's
  processes that died (a pool process that exited, the previous start of a worker
  restarted under the same node name, what a cold shutdown cut short).
- Processes: `worker_init` names the worker's boot before its pool forks, so every
  claim records its owner; `worker_process_init` gives each pool child its own
  store connections.
- Refused messages: a consumer bootstep and Celery's signals (delivery.py) record a
  step message that a worker dropped without running it.
- Definitions: another bootstep checks every saga once the worker has imported
  its modules, so that a broken definition stops the worker before it takes a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.app.task import Task
from celery.exceptions import WorkerLostError
from celery.signals import (
    after_setup_task_logger,
    task_failure,
    worker_init,
    worker_process_init,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.nodenames import worker_direct

from .config import Settings, default_broker_options, default_broker_url
from .context import StepLogFilter
from .definition import check_definitions
from .delivery import DecodeErrorStep
from .prefetched import requeue_prefetched_steps
from .runtime import HEADER, Runtime, current_runtime, set_default_runtime
from .stores.base import Store

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("sagaline")


def init_app(app: Celery, store: str | Store | None = None, **settings: Any) -> Runtime:
    """Set up sagaline on a Celery app; call it before the app's tasks run.

    `store` is a URL (or a Store); default: SAGALINE_STORE_URL, else a SQLite file
    in SAGALINE_HOME. Other keyword arguments override the settings of config.py.
    With no broker configured, the app gets kombu's server-less filesystem
    transport, so that one machine needs no server at all.
    """
    from .extras import check_broker_transport

    check_broker_transport(app.conf.broker_url)  # before anything is set up
    store_obj = store if isinstance(store, Store) else None
    url = store.url if isinstance(store, Store) else store
    conf = Settings.from_env(store_url=url, **settings)
    runtime = Runtime(app, conf, store=store_obj)
    app._sagaline_runtime = runtime
    set_default_runtime(runtime)

    if not app.conf.broker_url:
        app.conf.broker_url = default_broker_url()
        app.conf.broker_transport_options = {
            **default_broker_options(), **(app.conf.broker_transport_options or {})}

    _confirm_publishes(app)
    _install_step_wrapper(app)
    if DefinitionsStep not in app.steps["worker"]:
        app.steps["worker"].add(DefinitionsStep)
    if conf.sweeper and SweeperStep not in app.steps["worker"]:
        app.steps["worker"].add(SweeperStep)
    if DecodeErrorStep not in app.steps["consumer"]:
        app.steps["consumer"].add(DecodeErrorStep)
    return runtime


def _confirm_publishes(app: Celery) -> None:
    """On RabbitMQ (py-amqp), wait for the broker's confirm of every publish, unless the
    user chose otherwise: a step's message is published after its commit, and without
    confirms a message the broker drops (or a connection lost right after the write)
    looks sent, and the saga waits `redispatch_after` for the sweeper."""
    try:
        conn = app.connection_for_write()
        try:
            driver_type = conn.transport.driver_type
        finally:
            conn.release()
    except Exception:
        # A transport whose client library is missing: Celery reports it at first use,
        # with its own message; init_app is not the place to fail for it.
        return
    options = app.conf.broker_transport_options or {}
    if driver_type == "amqp" and "confirm_publish" not in options:
        app.conf.broker_transport_options = {**options, "confirm_publish": True}


def _install_step_wrapper(app: Celery) -> None:
    annotations = app.conf.task_annotations
    if annotations is None:
        entries: list[Any] = []
    elif isinstance(annotations, (list, tuple)):
        entries = list(annotations)
    else:
        entries = [annotations]
    if STEP_ANNOTATION not in entries:
        app.conf.task_annotations = [*entries, STEP_ANNOTATION]
        with contextlib.suppress(AttributeError):
            del app.annotations  # recomputed from the new setting on next use
    # Tasks Celery already created were annotated before this call: wrap them now.
    for task in list(app._tasks.values()):
        wrap_task_class(type(task))


def _around_call(orig: Any) -> Any:
    if getattr(orig, "_sagaline_wrapped", False):
        return orig
    plain = orig is Task.__call__

    def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        meta = getattr(request, HEADER, None) or (getattr(request, "headers", None) or {}).get(
            HEADER)
        if not meta:
            return orig(self, *args, **kwargs)
        # Call the body directly so that `self.request` stays the worker's request.
        body = self.run if plain else (lambda *a, **kw: orig(self, *a, **kw))
        return current_runtime(self.app).execute(self, body, args, kwargs, meta)

    __call__._sagaline_wrapped = True  # type: ignore[attr-defined]
    return __call__


def wrap_task_class(cls: type[Task]) -> None:
    current = cls.__dict__.get("__call__")
    if current is not None and getattr(current, "_sagaline_wrapped", False):
        return
    cls.add_around("__call__", _around_call)


STEP_ANNOTATION = {"*": {"@__call__": _around_call}}


@worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not share the parent's database connections.
    try:
        runtime = current_runtime()
    except Exception:
        return
    runtime.store  # noqa: B018 - re-created for this pid on first access


@worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _name_this_boot(sender: Any = None, **_: Any) -> None:
    # In the main process, before the pool forks: children inherit the node and boot.
    try:
        runtime = current_runtime(sender.app)
    except Exception:
        return
    runtime.worker_node = str(sender.hostname)
    runtime.worker_boot = uuid.uuid4().hex


@task_failure.connect(weak=False)  # type: ignore[untyped-decorator]
def _pool_process_lost(sender: Any = None, exception: BaseException | None = None,
                       **_: Any) -> None:
    # Sent in the main process when a pool process died running a task: wake the
    # sweeper thread to hand its claim back now (the periodic check would in a
    # sweep_interval; with acks_late + reject_on_worker_lost this is not sent at all).
    if not isinstance(exception, WorkerLostError):
        return
    try:
        runtime = current_runtime(getattr(sender, "app", None))
    except Exception:
        return
    runtime.process_lost.set()


@worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
def _stop_using_own_queue(**_: Any) -> None:
    # This worker stops consuming: retries of what it hands back from now on go to the
    # steps' own queues, where other workers find them.
    with contextlib.suppress(Exception):
        current_runtime().worker_queue = None


@worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _hand_back_after_shutdown(sender: Any = None, **_: Any) -> None:
    # After a warm shutdown the pool has finished its tasks and exited; whatever a
    # process of this boot still holds was cut short (it died on the way out).
    try:
        runtime = current_runtime(sender.app)
    except Exception:
        return
    hand_back_dead_processes(runtime)


def hand_back_dead_processes(runtime: Runtime) -> None:
    """Hand back the claims of this boot whose process no longer exists."""
    from .ops import hand_back_lost_claims

    if runtime.worker_node is None or runtime.worker_boot is None:
        return
    try:
        hand_back_lost_claims(runtime, runtime.worker_node, runtime.worker_boot,
                              _existing, earlier_boots=False, stopping=True)
    except Exception:
        log.exception("could not hand back the claims of exited processes")


def _existing(pids: Collection[int]) -> set[int]:
    """The pids that name a live process, and this one (it runs the solo/threads pool)."""
    found = {os.getpid()}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # it exists, under another user
        found.add(pid)
    return found


def pool_pids(pool: Any) -> set[int]:
    """The live processes that run this worker's tasks: the prefork pool's children
    (billiard drops a child from this list once it has reaped it), else this process."""
    # The same attribute that Celery's own prefork TaskPool._get_info reads.
    procs = getattr(getattr(pool, "_pool", None), "_pool", None)
    found = {os.getpid()}
    if isinstance(procs, list):
        found.update(p.pid for p in list(procs) if p.pid is not None)
    return found


@after_setup_task_logger.connect(weak=False)  # type: ignore[untyped-decorator]
def _saga_fields_in_task_logs(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers or logging.getLogger().handlers:
        if not any(isinstance(f, StepLogFilter) for f in handler.filters):
            handler.addFilter(StepLogFilter())


class DefinitionsStep(bootsteps.Step):  # type: ignore[misc]
    """Checks every saga definition when the worker starts (`check_definitions`).

    Celery builds the worker's bootsteps after it imported the modules of the app
    (`include`, `imports`): by then every builder saga is complete, and an empty
    saga or two sagas with one name raise DefinitionError here, before a message
    is taken, like an ImportError in those modules would.
    """

    label = "sagaline definitions"

    def __init__(self, worker: Any, **kwargs: Any):
        check_definitions()
        super().__init__(worker, **kwargs)


class SweeperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs `sweep()` every `sweep_interval` seconds in a thread of the worker's main process.

    Safe in every worker at once: each repair is a locked compare-and-set that
    re-checks the due time, so two sweepers never both act on the same item.

    The same thread hands back the claims of this worker's dead processes: at start,
    those of an earlier boot of this node name (they died with it); then, at every
    pass and as soon as a pool process is lost, those whose process has left the pool.
    Node names must be unique among running workers (Celery's own rule): a worker
    started under the name of one still running would take over its claims.
    """

    label = "sagaline sweeper"

    def __init__(self, worker: Any, **kwargs: Any):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        super().__init__(worker, **kwargs)
        # Consume Celery's worker-direct queue (what `worker_direct=True` does): the
        # retries of the steps this worker hands back go there, not behind the backlog.
        direct = worker_direct(worker.hostname)
        if direct.name not in worker.app.amqp.queues.consume_from:
            worker.app.amqp.queues.select_add(direct)
        with contextlib.suppress(Exception):
            current_runtime(worker.app).worker_queue = direct.name

    def start(self, worker: Any) -> None:
        runtime = current_runtime(worker.app)
        # Import the store's driver here, in the main thread, rather than in the thread
        # while the pool may be forking: a child forked mid-import would hang.
        runtime.store  # noqa: B018
        self._started = time.time()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(runtime, worker),
                                        name="sagaline-sweeper", daemon=True)
        self._thread.start()

    def _loop(self, runtime: Runtime, worker: Any) -> None:
        from .ops import sweep

        interval = runtime.settings.sweep_interval
        earlier_boots = True  # until one pass has looked at them
        for_a_sweep = interval
        try:
            requeue_prefetched_steps(worker.app, delivered_before=self._started)
        except Exception:
            log.exception("could not put back the step messages of stopped workers; the "
                          "sweeper publishes them again after redispatch_after")
        while not self._stop.is_set():
            runtime.process_lost.clear()
            with _fork_guard():
                if self._hand_back_lost(runtime, worker, earlier_boots=earlier_boots):
                    earlier_boots = False
            if for_a_sweep <= 0:
                for_a_sweep = interval
                try:
                    with _fork_guard():
                        sweep(runtime)
                except Exception:
                    log.exception("sweeper pass failed; trying again in %ss", interval)
            waited = _wait_either(runtime.process_lost, self._stop, for_a_sweep)
            for_a_sweep -= waited

    def _hand_back_lost(self, runtime: Runtime, worker: Any, *, earlier_boots: bool) -> bool:
        from .ops import hand_back_lost_claims

        node, boot = runtime.worker_node, runtime.worker_boot
        if node is None or boot is None:
            return True
        try:
            # Pages of claims: at start, an earlier boot may have left more than one.
            for _ in range(50):
                acted = hand_back_lost_claims(
                    runtime, node, boot,
                    lambda pids: pool_pids(getattr(worker, "pool", None)),
                    earlier_boots=earlier_boots)
                if acted == 0:
                    break
            return True
        except Exception:
            log.exception("could not look for the claims of dead processes; trying again "
                          "in %ss", runtime.settings.sweep_interval)
            return False

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # A cold shutdown has stopped the pool by now, cutting its tasks short.
        hand_back_dead_processes(current_runtime(worker.app))

    # Without it, StartStopStep.terminate (a cold shutdown) would not stop the thread.
    terminate = stop
    shutdown = stop


# The pool forks its children from the main thread (at start, and to replace one that
# died, which is exactly when this thread is busy handing its claims back). A child
# forked while this thread holds a lock (the store's connection pool, the broker's
# producer pool, an import) inherits it held by a thread that does not exist there,
# and hangs. So a fork waits until this thread is between two passes, but never
# long: a pass that waits out a store outage must not freeze the worker's event loop
# (a child that still hangs is replaced by billiard after its start-up timeout).
_FORK_LOCK = threading.RLock()
_FORK_WAIT = 5.0
_forking = threading.local()


def _fork_guard() -> threading.RLock:
    return _FORK_LOCK


def _before_fork() -> None:
    _forking.held = _FORK_LOCK.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    if getattr(_forking, "held", False):
        _forking.held = False
        _FORK_LOCK.release()


def _after_fork_in_child() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()  # held by the forking thread of the parent: start anew
    _forking.held = False


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _wait_either(event: threading.Event, stop: threading.Event, timeout: float) -> float:
    """Wait up to `timeout` s for either event, in short slices; the seconds waited."""
    started = time.monotonic()
    while not event.is_set() and not stop.is_set():
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            break
        event.wait(min(left, 0.2))
    return time.monotonic() - started
