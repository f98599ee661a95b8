"""Carries out the engine's decisions: store calls, Celery publishes, leases, signals."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import children, delivery, engine, execution, payload, publishing, signals
from ._state import current_runtime as current_runtime  # re-exported: a public import path
from ._state import registered_saga
from ._state import set_default_runtime as set_default_runtime
from .context import about_saga, saga_log_extra
from .definition import Saga
from .exceptions import ConfigurationError, IdempotencyConflict, InputError
from .forking import child_safe_lock
from .handle import SagaHandle as SagaHandle
from .leases import Heartbeat
from .names import check_saga_id
from .publishing import DelayedPublisher as DelayedPublisher  # re-exported
from .records import HEADER as HEADER
from .records import Decision, Dispatch, SagaRecord, SagaState
from .states import SAGA_TERMINAL, FailureReason
from .stores.base import Store
from .stores.registry import store_from_url

if TYPE_CHECKING:
    from celery import Celery

    from .config import Settings
    from .observability.tracing import Tracing

log = logging.getLogger("sagaline")


class Runtime:
    """The bridge between one Celery app, the store and the engine, in one process."""

    def __init__(self, app: Celery, settings: Settings, store: Store | None = None):
        self.app = app
        self.settings = settings
        self.timing = engine.Timing(
            redispatch_after=settings.redispatch_after,
            crash_retries=settings.crash_retries,
            max_payload_bytes=settings.max_payload_bytes,
        )
        self._store = store
        self._store_pid = os.getpid() if store is not None else None
        self._lock = child_safe_lock()
        self._heartbeat: Heartbeat | None = None
        # Set in a worker's main process before its pool forks (celery_app.py), so that
        # every claim names the node, the boot and the process that runs the step.
        self.worker_node: str | None = None
        self.worker_boot: str | None = None
        # The queue that only this worker consumes (Celery's worker-direct queue), where
        # it sends the retries of the steps it hands back.
        self.worker_queue: str | None = None
        # Set when the worker's main process sees a pool process die mid-task: its
        # sweeper thread then looks for lost claims at once.
        self.process_lost = threading.Event()
        self._delayed: DelayedPublisher | None = None
        self._tracing: Tracing | None = None
        self._tracing_failed = False
        # Setting tracing up is slow (imports, an exporter): under a lock of its own,
        # never the store's.
        self._tracing_lock = child_safe_lock()
        # Called with each store this runtime opens (metrics time its operations).
        self.store_hooks: list[Callable[[Store], None]] = []
        # The one clock of every decision this runtime carries out (claims, leases,
        # completions, the sweeper): a test environment gives it virtual time.
        self.clock: Callable[[], float] = time.time

    def now(self) -> float:
        """The current time, in seconds since the epoch, from this runtime's clock."""
        return self.clock()

    # -- store, per process --------------------------------------------------------

    @property
    def store(self) -> Store:
        pid = os.getpid()
        if self._store is None or self._store_pid != pid:
            with self._lock:
                if self._store is None:
                    self._store = store_from_url(
                        self.settings.store_url,
                        echo=self.settings.echo_sql,
                        auto_migrate=self.settings.auto_migrate,
                    )
                    for hook in self.store_hooks:
                        hook(self._store)
                elif self._store_pid != pid:
                    # A forked pool child keeps the same store object (and its options)
                    # but must not share the parent's connections.
                    self._store.dispose_after_fork()
                    self._heartbeat = None
                    self._delayed = None  # its thread (and queue) stayed in the parent
                self._store_pid = pid
        return self._store

    @property
    def tracing(self) -> Tracing | None:
        """sagaline's spans in this process, or None when tracing is off."""
        if self.settings.tracing == "off" or self._tracing_failed:
            return None
        if self._tracing is None:
            with self._tracing_lock:
                if self._tracing is None and not self._tracing_failed:
                    try:
                        # Imported only here: without the `otel` extra the core never
                        # imports OpenTelemetry (init_app checked that it imports).
                        from .observability import tracing
                        from .observability.provider import install_provider

                        install_provider(service_name=self.app.main)
                        self._tracing = tracing.Tracing()
                    except Exception:
                        # Traces must never stop sagas: this process runs them untraced.
                        self._tracing_failed = True
                        log.exception(
                            "tracing is on but could not be set up; this process traces nothing"
                        )
        return self._tracing

    def flush_traces(self) -> None:
        """Export the spans this process holds (a pool process exits without it)."""
        if self._tracing is not None:
            self._tracing.flush()

    def definition(self, name: str) -> Saga:
        defn = registered_saga(name)
        if defn is None:
            raise ConfigurationError(
                f"saga {name!r} is not defined in this process: import the module that "
                f"defines it (e.g. through the Celery app's `include`)"
            )
        return defn

    def definition_for(self, saga: SagaRecord) -> Saga | None:
        """The definition this saga was started with, or None (logged) if this process
        has other code for it: deciding with another graph would corrupt the saga."""
        defn = registered_saga(saga.name)
        if defn is not None and defn.fingerprint == saga.fingerprint:
            return defn
        log.error(
            "saga %s (%s) was started with definition %s; this process has %s: "
            "leaving it to a process with that code",
            saga.saga_id,
            saga.name,
            saga.fingerprint,
            "none" if defn is None else defn.fingerprint,
            extra=saga_log_extra(saga.saga_id, saga.name),
        )
        return None

    # -- starting --------------------------------------------------------------------

    def start_saga(
        self,
        defn: Saga,
        input: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        parent_saga_id: str | None = None,
        parent_step: str | None = None,
        saga_id: str | None = None,
        trace_parent: str | None = None,
    ) -> SagaHandle:
        defn.check_complete()
        # Everything is checked before anything is stored (payload.py has the rules).
        payload.check_object(input, "input", max_bytes=self.settings.max_payload_bytes)
        input_fingerprint = None
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str):
                raise InputError(
                    f"idempotency_key must be a string, got {type(idempotency_key).__name__}",
                    rule="type",
                    where="idempotency_key",
                )
            payload.check_text(
                idempotency_key,
                "idempotency_key",
                limit=payload.MAX_KEY_LENGTH,
                rule="key",
                where="idempotency_key",
            )
            input_fingerprint = payload.fingerprint(input)
        if saga_id:
            check_saga_id(saga_id)
        saga_id = saga_id or str(uuid.uuid4())
        # In the trace of the caller's current span (a child saga: of its parent's root).
        tracing = self.tracing
        trace_context = (
            tracing.new_saga(defn.name, saga_id, parent=trace_parent)
            if tracing is not None
            else None
        )
        now = self.now()
        state, decision = engine.start(
            defn,
            saga_id,
            input,
            now=now,
            timing=self.timing,
            idempotency_key=idempotency_key,
            parent_saga_id=parent_saga_id,
            parent_step=parent_step,
            input_fingerprint=input_fingerprint,
            trace_context=trace_context,
        )
        saga, created = self.store.create_saga(state, decision.events)
        if (
            not created
            and saga.input_fingerprint is not None
            and saga.input_fingerprint != input_fingerprint
        ):
            # The key is taken by a saga started with other input: replaying it would
            # silently drop this input. (A saga from before fingerprints were kept has
            # None and is returned as before.)
            raise IdempotencyConflict(defn.name, str(idempotency_key), saga.saga_id)
        if created:
            signals.saga_started.send(sender=self, saga_id=saga.saga_id, name=saga.name)
            self.after_commit(decision)
        return SagaHandle(self, saga.saga_id, saga.name)

    # -- advancing -------------------------------------------------------------------

    def transact(
        self, saga_id: str, decide: Callable[[Saga, SagaState], Decision | None]
    ) -> Decision | None:
        """Run an engine decision under the saga's lock, then publish what it decided."""

        def with_definition(state: SagaState) -> Decision | None:
            defn = self.definition_for(state.saga)
            return None if defn is None else decide(defn, state)

        # What the store, the publishes and the signals log meanwhile names the saga.
        with about_saga(saga_id):
            decision = self.store.transact(saga_id, with_definition)
            if decision is not None:
                self.after_commit(decision)
        return decision

    def apply(
        self, saga_id: str, decide: Callable[..., Decision | None], *args: Any, **kwargs: Any
    ) -> Decision | None:
        """`transact` with an engine or recovery decision function: it is called with
        the saga's definition and state, `args`, `kwargs`, and the current time and
        timing (taken inside the transaction, so a retried one decides afresh)."""
        return self.transact(
            saga_id,
            lambda defn, st: decide(defn, st, *args, now=self.now(), timing=self.timing, **kwargs),
        )

    def after_commit(self, decision: Decision) -> None:
        self.publish(decision.dispatches)
        self._announce(decision)

    def _announce(self, decision: Decision) -> None:
        tracing = self.tracing
        if tracing is not None:
            tracing.after_commit(decision, self.store)
        if decision.saga is not None and decision.saga.status in SAGA_TERMINAL:
            s = decision.saga
            signals.saga_finished.send(
                sender=self,
                saga_id=s.saga_id,
                name=s.name,
                status=s.status,
                duration=self.now() - s.created_at,
            )
            if s.parent_saga_id is not None:
                children.notify_parent(self, s)

    def publish(self, dispatches: list[Dispatch]) -> None:
        # A worklist rather than recursion: failing an undeliverable message may
        # dispatch compensations, whose messages may be undeliverable too. It ends:
        # each undeliverable message settles its step for good.
        todo = list(dispatches)
        while todo:
            d = todo.pop(0)
            if d.countdown > 0:
                # A retry's backoff is never a broker ETA (see DelayedPublisher): the
                # message is sent when due; the store's due time covers this process dying.
                self.delayed_publisher().add(d)
                continue
            try:
                self._publish_one(d)
            except Exception as exc:
                if not delivery.undeliverable(exc):
                    # Committed as DISPATCHED: the sweeper publishes it again after
                    # `redispatch_after`, so a lost publish delays the saga, never loses it.
                    log.exception(
                        "could not publish %s of saga %s step %s (attempt %s); "
                        "the sweeper will publish it again",
                        d.phase,
                        d.saga_id,
                        d.step,
                        d.attempt,
                        extra=saga_log_extra(d.saga_id, None, d.step, d.phase, d.attempt),
                    )
                    continue
                log.error(
                    "saga %s step %s %s attempt %s: its message cannot be sent (%s: "
                    "%s); the step fails",
                    d.saga_id,
                    d.step,
                    d.phase,
                    d.attempt,
                    type(exc).__name__,
                    exc,
                    extra=saga_log_extra(d.saga_id, None, d.step, d.phase, d.attempt),
                )
                decision = delivery.fail_undeliverable(
                    self,
                    d.saga_id,
                    d.step,
                    d.phase,
                    d.attempt,
                    reason=FailureReason.MESSAGE_UNSENDABLE,
                    error=f"message not sent: {engine.describe_error(exc)}",
                    claimed=d.child_saga is not None,
                )
                if decision is not None:
                    todo += decision.dispatches
                    self._announce(decision)

    def _publish_one(self, d: Dispatch) -> None:
        if d.child_saga is not None:
            children.run_child(self, d)
            return
        tracing = self.tracing if d.trace_context is not None else None
        publishing.send_step(self.app, d, tracing)

    def delayed_publisher(self) -> DelayedPublisher:
        pid = os.getpid()
        if self._delayed is None or self._delayed.pid != pid:
            with self._lock:
                if self._delayed is None or self._delayed.pid != pid:
                    self._delayed = DelayedPublisher(self._publish_due)
        return self._delayed

    def _publish_due(self, d: Dispatch) -> None:
        self.publish([replace(d, countdown=0.0)])

    # -- steps and child sagas (execution.py, children.py) ---------------------------

    def execute(
        self,
        task: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
    ) -> Any:
        """Run one step message in this worker (see `execution.execute`)."""
        return execution.execute(self, task, body, args, kwargs, meta)

    def drive_child(self, parent_id: str, step: str) -> None:
        """Move a claimed child-saga step along (see `children.drive_child`)."""
        children.drive_child(self, parent_id, step)

    def heartbeat(self) -> Heartbeat:
        if self._heartbeat is None:
            with self._lock:
                if self._heartbeat is None:
                    self._heartbeat = Heartbeat(self.store, self.settings.lease, self.now)
        return self._heartbeat
