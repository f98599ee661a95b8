"""`init_app(app)`: wires sagaline into a Celery app through Celery's own extension points.

- Step execution: a `task_annotations` entry wraps every task's `__call__`
  (Celery's documented `@__call__` annotation); a message without sagaline's
  header runs untouched, a saga step is claimed before and completed after.
- Recovery: a worker bootstep runs the sweeper in every `celery worker`.
- Processes: `worker_process_init` gives each pool child its own store connections.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.app.task import Task
from celery.signals import after_setup_task_logger, worker_process_init

from .config import Settings, default_broker_options, default_broker_url
from .context import StepLogFilter
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

    _install_step_wrapper(app)
    if conf.sweeper and SweeperStep not in app.steps["worker"]:
        app.steps["worker"].add(SweeperStep)
    return runtime


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


@after_setup_task_logger.connect(weak=False)  # type: ignore[untyped-decorator]
def _saga_fields_in_task_logs(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers or logging.getLogger().handlers:
        if not any(isinstance(f, StepLogFilter) for f in handler.filters):
            handler.addFilter(StepLogFilter())


class SweeperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs `sweep()` every `sweep_interval` seconds in a thread of the worker's main process.

    Safe in every worker at once: each repair is a locked compare-and-set that
    re-checks the due time, so two sweepers never both act on the same item.
    """

    label = "sagaline sweeper"

    def __init__(self, worker: Any, **kwargs: Any):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        runtime = current_runtime(worker.app)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(runtime,),
                                        name="sagaline-sweeper", daemon=True)
        self._thread.start()

    def _loop(self, runtime: Runtime) -> None:
        from .ops import sweep

        while not self._stop.wait(runtime.settings.sweep_interval):
            try:
                sweep(runtime)
            except Exception:
                log.exception("sweeper pass failed; trying again in %ss",
                              runtime.settings.sweep_interval)

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    shutdown = stop
