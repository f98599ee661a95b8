"""`init_app(app)`: wires sagaline into a Celery app through Celery's own extension points.

- Step execution: a `task_annotations` entry wraps every task's `__call__`
  (Celery's documented `@__call__` annotation); a message without sagaline's
  header runs untouched, a saga step is claimed before and completed after. The
  same entry gives each task a `Request` class that acknowledges a saga step's
  message only once the step ended, and settles at once what a pool process
  that died left of its step (acking.py).
- Recovery: a worker bootstep (sweeper.py) runs the sweeper in every `celery worker`;
  its thread also hands back, without waiting for their leases, the claims of this
  worker's processes that died (a pool process that exited, the previous start of a
  worker restarted under the same node name, what a cold shutdown cut short).
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
import uuid
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.app.task import Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from .acking import HeldAcksStep, step_request_class
from .config import Settings, default_broker_options, default_broker_url, ready_file
from .context import StepLogFilter
from .definition import check_definitions
from .delivery import DecodeErrorStep
from .observability.health import HeartbeatStep
from .runtime import HEADER, Runtime, current_runtime, set_default_runtime
from .stores.base import Store
from .sweeper import SweeperStep, hand_back_dead_processes

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
            **default_broker_options(),
            **(app.conf.broker_transport_options or {}),
        }

    _confirm_publishes(app)
    _install_step_wrapper(app)
    if DefinitionsStep not in app.steps["worker"]:
        app.steps["worker"].add(DefinitionsStep)
    if conf.sweeper and SweeperStep not in app.steps["worker"]:
        app.steps["worker"].add(SweeperStep)
    for step in (DecodeErrorStep, HeldAcksStep):
        if step not in app.steps["consumer"]:
            app.steps["consumer"].add(step)
    if HeartbeatStep not in app.steps["worker"]:
        app.steps["worker"].add(HeartbeatStep)
    if conf.metrics_port:
        from .observability import metrics

        metrics.install(runtime, conf.metrics_port)
    if conf.outbox_routes:  # the outbox relay (a bootstep) and optimistic sending
        from .outbox.worker import install

        install(app, conf)
    worker_ready.connect(_announce_ready, weak=False, dispatch_uid="sagaline.ready_file")
    if conf.log_format == "json":
        # Celery sends these once it set up the worker's handlers (root, then task logger).
        after_setup_logger.connect(_json_logs, weak=False, dispatch_uid="sagaline.json_logs")
        after_setup_task_logger.connect(
            _json_logs, weak=False, dispatch_uid="sagaline.json_task_logs"
        )
    if conf.tracing != "off":
        # Fails now, naming the extra, if OpenTelemetry is missing. The provider itself is
        # set at first use, so an application that sets its own after this call wins.
        from .observability import tracing  # noqa: F401
        from .observability.provider import preload_exporter

        preload_exporter()
    return runtime


def _json_logs(logger: logging.Logger, **_: Any) -> None:
    from .observability.logs import use_json

    use_json(logger)


def _announce_ready(**_: Any) -> None:
    # Launchers (sagaline.testing.WorkerProcess, `sagaline demo`) start sagas only once
    # the worker consumes; short of polling it over the broker, this file is the sign.
    path = ready_file()
    if path is not None:
        path.touch()


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
            HEADER
        )
        if not meta:
            return orig(self, *args, **kwargs)
        # Call the body directly so that `self.request` stays the worker's request.
        body = self.run if plain else (lambda *a, **kw: orig(self, *a, **kw))
        return current_runtime(self.app).execute(self, body, args, kwargs, meta)

    __call__._sagaline_wrapped = True  # type: ignore[attr-defined]
    return __call__


def _around_request(orig: Any) -> Any:
    return step_request_class(orig)


def wrap_task_class(cls: type[Task]) -> None:
    current = cls.__dict__.get("__call__")
    if current is None or not getattr(current, "_sagaline_wrapped", False):
        cls.add_around("__call__", _around_call)
    if not getattr(cls.Request, "_sagaline_holds_acks", False):
        cls.add_around("Request", _around_request)


STEP_ANNOTATION = {"*": {"@__call__": _around_call, "@Request": _around_request}}


@worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not share the parent's database connections.
    try:
        runtime = current_runtime()
    except Exception:
        return
    runtime.store  # noqa: B018 - re-created for this pid on first access


@task_prerun.connect(weak=False)  # type: ignore[untyped-decorator]
def _tracing_before_first_task(**_: Any) -> None:
    # The TracerProvider is set at first use, late enough that an application setting
    # its own (in worker_process_init, as OpenTelemetry advises) wins; this is before
    # the first task's task_prerun reaches a Celery instrumentation, whose first span
    # would otherwise be made before any provider is set, and dropped.
    with contextlib.suppress(Exception):
        runtime = current_runtime()
        if runtime.settings.tracing != "off":
            runtime.tracing  # noqa: B018 - set up on first access


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _flush_spans(**_: Any) -> None:
    # A pool process leaves through os._exit: the SDK's exit handler, which exports
    # the spans it still holds, would not run.
    with contextlib.suppress(Exception):
        current_runtime().flush_traces()


@worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _name_this_boot(sender: Any = None, **_: Any) -> None:
    # In the main process, before the pool forks: children inherit the node and boot.
    try:
        runtime = current_runtime(sender.app)
    except Exception:
        return
    runtime.worker_node = str(sender.hostname)
    runtime.worker_boot = uuid.uuid4().hex


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
    # The spans of this process (the sweeper's, the hand-back's) are exported now, not
    # left to an exit handler that an application's TracerProvider may not have.
    with contextlib.suppress(Exception):
        runtime.flush_traces()


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
