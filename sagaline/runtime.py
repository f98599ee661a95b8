"""Carries out the engine's decisions: store calls, Celery publishes, leases, signals."""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, SoftTimeLimitExceeded

from . import delivery, engine, payload, recovery, signals
from ._state import current_runtime as current_runtime  # re-exported: a public import path
from ._state import set_default_runtime as set_default_runtime
from .context import StepInfo, _current
from .definition import Saga, StepResponse, filter_kwargs, registered_saga
from .exceptions import (
    ConfigurationError,
    IdempotencyConflict,
    InputError,
    SagaCompensated,
    SagaFailed,
    SagaNotFound,
    SagaTimeout,
    StepFailure,
)
from .records import Decision, Dispatch, Event, Owner, SagaRecord, SagaState, StepRecord
from .states import SAGA_TERMINAL, CompensationStatus, Phase, SagaStatus, StepStatus
from .stores.base import Store, store_from_url

if TYPE_CHECKING:
    from celery import Celery

    from .config import Settings

log = logging.getLogger("sagaline")
HEADER = "sagaline"

class Runtime:
    """The bridge between one Celery app, the store and the engine, in one process."""

    def __init__(self, app: Celery, settings: Settings, store: Store | None = None):
        self.app = app
        self.settings = settings
        self.timing = engine.Timing(redispatch_after=settings.redispatch_after,
                                    crash_retries=settings.crash_retries,
                                    max_payload_bytes=settings.max_payload_bytes)
        self._store = store
        self._store_pid = os.getpid() if store is not None else None
        self._lock = threading.Lock()
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

    # -- store, per process --------------------------------------------------------

    @property
    def store(self) -> Store:
        pid = os.getpid()
        if self._store is None or self._store_pid != pid:
            with self._lock:
                if self._store is None:
                    self._store = store_from_url(self.settings.store_url,
                                                 echo=self.settings.echo_sql,
                                                 auto_migrate=self.settings.auto_migrate)
                elif self._store_pid != pid:
                    # A forked pool child keeps the same store object (and its options)
                    # but must not share the parent's connections.
                    self._store.dispose_after_fork()
                    self._heartbeat = None
                    self._delayed = None  # its thread (and queue) stayed in the parent
                self._store_pid = pid
        return self._store

    def definition(self, name: str) -> Saga:
        defn = registered_saga(name)
        if defn is None:
            raise ConfigurationError(
                f"saga {name!r} is not defined in this process: import the module that "
                f"defines it (e.g. through the Celery app's `include`)")
        return defn

    def definition_for(self, saga: SagaRecord) -> Saga | None:
        """The definition this saga was started with, or None (logged) if this process
        has other code for it: deciding with another graph would corrupt the saga."""
        defn = registered_saga(saga.name)
        if defn is not None and defn.fingerprint == saga.fingerprint:
            return defn
        log.error("saga %s (%s) was started with definition %s; this process has %s: "
                  "leaving it to a process with that code", saga.saga_id, saga.name,
                  saga.fingerprint, "none" if defn is None else defn.fingerprint)
        return None

    # -- starting --------------------------------------------------------------------

    def start_saga(self, defn: Saga, input: dict[str, Any], *,
                   idempotency_key: str | None = None, parent_saga_id: str | None = None,
                   parent_step: str | None = None, saga_id: str | None = None) -> SagaHandle:
        defn.check_complete()
        # Everything is checked before anything is stored (payload.py has the rules).
        payload.check_object(input, "input", max_bytes=self.settings.max_payload_bytes)
        input_fingerprint = None
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str):
                raise InputError(f"idempotency_key must be a string, got "
                                 f"{type(idempotency_key).__name__}", rule="type",
                                 where="idempotency_key")
            payload.check_text(idempotency_key, "idempotency_key",
                               limit=payload.MAX_KEY_LENGTH, rule="key",
                               where="idempotency_key")
            input_fingerprint = payload.fingerprint(input)
        now = time.time()
        state, decision = engine.start(defn, saga_id or str(uuid.uuid4()), input, now=now,
                                       timing=self.timing, idempotency_key=idempotency_key,
                                       parent_saga_id=parent_saga_id, parent_step=parent_step,
                                       input_fingerprint=input_fingerprint)
        saga, created = self.store.create_saga(state, decision.events)
        if not created and saga.input_fingerprint is not None and \
                saga.input_fingerprint != input_fingerprint:
            # The key is taken by a saga started with other input: replaying it would
            # silently drop this input. (A saga from before fingerprints were kept has
            # None and is returned as before.)
            raise IdempotencyConflict(defn.name, str(idempotency_key), saga.saga_id)
        if created:
            signals.saga_started.send(sender=self, saga_id=saga.saga_id, name=saga.name)
            self.after_commit(decision)
        return SagaHandle(self, saga.saga_id, saga.name)

    # -- advancing -------------------------------------------------------------------

    def transact(self, saga_id: str, decide: Callable[[Saga, SagaState], Decision | None]
                 ) -> Decision | None:
        """Run an engine decision under the saga's lock, then publish what it decided."""

        def with_definition(state: SagaState) -> Decision | None:
            defn = self.definition_for(state.saga)
            return None if defn is None else decide(defn, state)

        decision = self.store.transact(saga_id, with_definition)
        if decision is not None:
            self.after_commit(decision)
        return decision

    def after_commit(self, decision: Decision) -> None:
        self.publish(decision.dispatches)
        self._announce(decision)

    def _announce(self, decision: Decision) -> None:
        if decision.saga is not None and decision.saga.status in SAGA_TERMINAL:
            s = decision.saga
            signals.saga_finished.send(sender=self, saga_id=s.saga_id, name=s.name,
                                       status=s.status, duration=time.time() - s.created_at)
            if s.parent_saga_id is not None:
                self.notify_parent(s)

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
                    log.exception("could not publish %s of saga %s step %s (attempt %s); "
                                  "the sweeper will publish it again", d.phase, d.saga_id,
                                  d.step, d.attempt)
                    continue
                log.error("saga %s step %s %s attempt %s: its message cannot be sent (%s: "
                          "%s); the step fails", d.saga_id, d.step, d.phase, d.attempt,
                          type(exc).__name__, exc)
                decision = delivery.fail_undeliverable(
                    self, d.saga_id, d.step, d.phase, d.attempt, reason="message_unsendable",
                    error=f"message not sent: {engine.describe_error(exc)}",
                    claimed=d.child_saga is not None)
                if decision is not None:
                    todo += decision.dispatches
                    self._announce(decision)

    def _publish_one(self, d: Dispatch) -> None:
        if d.child_saga is not None:
            self._run_child(d)
            return
        task = self.app.tasks.get(d.task_name)
        # Send only what the task accepts (the worker filters again, for senders that
        # do not import the task).
        kwargs = filter_kwargs(task.run, d.kwargs) if task is not None else dict(d.kwargs)
        options: dict[str, Any] = {
            "headers": {HEADER: {"saga_id": d.saga_id, "saga": d.saga_name,
                                 "fingerprint": d.fingerprint, "step": d.step,
                                 "phase": d.phase.value, "attempt": d.attempt}},
            "serializer": "json",
            "ignore_result": True,
        }
        if d.queue:
            options["queue"] = d.queue
        if d.timeout and d.phase is Phase.FORWARD:
            options["soft_time_limit"] = d.timeout
            options["time_limit"] = d.timeout + max(5.0, d.timeout * 0.1)
        if task is not None:
            task.apply_async(args=(), kwargs=kwargs, **options)
        else:
            self.app.send_task(d.task_name, args=(), kwargs=kwargs, **options)

    # -- child sagas -------------------------------------------------------------------
    #
    # A child-saga step has no message of its own: dispatching it creates the child
    # (idempotently: its id and key derive from the parent step and attempt) and
    # claims the parent step; the child's final transition completes the parent
    # step. Should the process die in between, the parent step's due time brings
    # the sweeper to `drive_child`, which finishes the job.

    def _run_child(self, d: Dispatch) -> None:
        now = time.time()
        # Claim first: the child may end before this function returns, and its
        # notification must find the parent step RUNNING.
        if not self.store.claim_step(d.saga_id, d.step, d.phase, d.attempt,
                                     lease_until=now + self.settings.redispatch_after, now=now):
            return
        if d.phase is Phase.FORWARD:
            input = {k: v for k, v in d.kwargs.items() if k != "saga_id"}
            try:
                self.start_saga(self.definition(str(d.child_saga)), input,
                                idempotency_key=f"{d.saga_id}:{d.step}:{d.attempt}",
                                parent_saga_id=d.saga_id, parent_step=d.step,
                                saga_id=child_saga_id(d.saga_id, d.step, d.attempt))
            except InputError as exc:
                # The same input would be refused on every try: fail the step for good
                # (raising would leave it to the sweeper, which would try for ever).
                error = f"InputError: {exc}"
                self.transact(d.saga_id, lambda defn, st: engine.step_failed(
                    defn, st, d.step, d.attempt, error=error, permanent=True,
                    reason="payload_refused", now=time.time(), timing=self.timing))
                return
        self.drive_child(d.saga_id, d.step)

    def drive_child(self, parent_id: str, step: str) -> None:
        """Move a claimed child-saga step (or its compensation) as far as it can go.

        Called right after the claim and by the sweeper whenever the step is due, so
        that a process dying anywhere in between leaves nothing stuck.
        """
        rec = next((s for s in self.store.get_steps(parent_id) if s.name == step), None)
        if rec is None:
            return
        compensating = rec.comp_status is CompensationStatus.RUNNING
        if not compensating and rec.status is not StepStatus.RUNNING:
            return
        phase = Phase.COMPENSATE if compensating else Phase.FORWARD
        child_id = child_of(parent_id, rec)
        child = self.store.get_saga(child_id)
        now = time.time()
        if child is None:
            if compensating:  # no child was ever created: nothing to undo
                self.transact(parent_id, lambda defn, st: engine.compensation_succeeded(
                    defn, st, step, rec.comp_attempt, now=now, timing=self.timing))
            else:  # claimed, then the process died before creating it: a crashed attempt
                self.transact(parent_id, lambda defn, st: recovery.lease_expired(
                    defn, st, step, now=now, timing=self.timing))
            return
        if compensating:
            cause = f"parent saga {parent_id} is rolling back"
            if child.status is SagaStatus.COMPLETED:
                self.transact(child_id, lambda defn, st: recovery.rollback_completed(
                    defn, st, cause=cause, now=now, timing=self.timing))
            elif child.status is SagaStatus.FAILED:
                self.transact(child_id, lambda defn, st: recovery.resume(
                    defn, st, now=now, timing=self.timing))
            elif child.status is SagaStatus.RUNNING:
                # Its outcome was given up on (a grace period ended): stop it; it then
                # compensates itself and its end completes this compensation.
                self.transact(child_id, lambda defn, st: recovery.cancel(
                    defn, st, reason=cause, now=now, timing=self.timing))
            child = self.store.get_saga(child_id) or child
            done = child.status in (SagaStatus.COMPENSATED, SagaStatus.FAILED)
        else:
            done = child.status in SAGA_TERMINAL
        if done:
            self.notify_parent(child)
        else:
            self.store.renew_lease(parent_id, step, phase, rec.attempt_for(phase),
                                   time.time() + self.settings.redispatch_after)

    def notify_parent(self, child: SagaRecord) -> None:
        parent_id, step = str(child.parent_saga_id), str(child.parent_step)

        def decide(defn: Saga, st: SagaState) -> Decision | None:
            rec = st.steps[step]
            now = time.time()
            if rec.comp_status is not None:
                if child.saga_id != child_of(parent_id, rec):
                    return None
                if child.status is SagaStatus.COMPENSATED:
                    return engine.compensation_succeeded(defn, st, step, rec.comp_attempt,
                                                         now=now, timing=self.timing)
                if child.status is SagaStatus.FAILED:
                    return engine.compensation_failed(
                        defn, st, step, rec.comp_attempt, now=now, timing=self.timing,
                        error=f"child saga {child.saga_id} failed: {child.error}")
                return None
            if child.saga_id != child_saga_id(parent_id, step, rec.attempt):
                return None  # a child of an earlier attempt
            if child.status is SagaStatus.COMPLETED:
                added = engine.changed_keys(child.input, child.output) \
                    if isinstance(child.output, dict) else child.output
                return engine.step_succeeded(
                    defn, st, step, rec.attempt, output=added,
                    compensation_data={"child_saga_id": child.saga_id},
                    has_compensation_data=True, now=now, timing=self.timing)
            return engine.step_failed(
                defn, st, step, rec.attempt, now=now, timing=self.timing,
                reason="child_saga_" + child.status.value.lower(),
                error=f"child saga {child.name} {child.saga_id} ended {child.status.value}: "
                      f"{child.error}")

        self.transact(parent_id, decide)

    # -- executing steps (inside the worker) ---------------------------------------------

    def execute(self, task: Any, body: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], meta: dict[str, Any]) -> Any:
        saga_id, step = str(meta["saga_id"]), str(meta["step"])
        phase, attempt = Phase(meta["phase"]), int(meta["attempt"])
        defn = registered_saga(str(meta["saga"]))
        if defn is None or defn.fingerprint != meta.get("fingerprint"):
            self._refuse_unknown_definition(meta, defn)
            raise Ignore()
        now = time.time()
        lease = self.settings.lease
        if not self.store.claim_step(saga_id, step, phase, attempt, lease_until=now + lease,
                                     now=now, owner=self.claim_owner()):
            log.info("saga %s step %s %s attempt %s: claim refused (duplicate or stale "
                     "message); not running it", saga_id, step, phase, attempt)
            raise Ignore()
        signals.step_started.send(sender=self, saga_id=saga_id, name=defn.name, step=step,
                                  phase=phase, attempt=attempt)
        heartbeat = self.heartbeat()
        token = heartbeat.add(saga_id, step, phase, attempt)
        ctx_token = _current.set(StepInfo(saga_id, defn.name, step, attempt, phase))
        kwargs = filter_kwargs(task.run, kwargs)
        try:
            return self._run_and_complete(defn, body, args, kwargs, saga_id, step, phase,
                                          attempt)
        finally:
            # Renewed until the completion committed: a store outage during completion
            # must not let the lease expire and re-run a body that already finished.
            heartbeat.remove(token)
            _current.reset(ctx_token)

    def _run_and_complete(self, defn: Saga, body: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any], saga_id: str, step: str, phase: Phase,
                          attempt: int) -> Any:
        started = time.monotonic()
        try:
            result = body(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, Ignore):
                raise
            self._record_failure(defn, saga_id, step, phase, attempt, exc, started)
            raise
        if phase is Phase.COMPENSATE:
            self.transact(saga_id, lambda d, st: engine.compensation_succeeded(
                d, st, step, attempt, now=time.time(), timing=self.timing))
            self._step_finished(defn, saga_id, step, phase, attempt, "succeeded", started)
            return None
        if isinstance(result, StepResponse):
            output, comp, has_comp = (result.output, result.compensation_data,
                                      result.has_compensation_data)
        else:
            output, comp, has_comp = result, None, False
        try:
            self._check_output(step, output, comp, has_comp)
        except InputError as exc:
            # Retrying would produce the same value: fail permanently (and compensate).
            message = f"InputError: {exc}"
            self.transact(saga_id, lambda d, st: engine.step_failed(
                d, st, step, attempt, error=message, permanent=True,
                reason="payload_refused", now=time.time(), timing=self.timing))
            self._step_finished(defn, saga_id, step, phase, attempt, "failed", started)
            raise InputError(str(exc), rule=exc.rule, where=exc.where) from None
        self.transact(saga_id, lambda d, st: engine.step_succeeded(
            d, st, step, attempt, output=output, compensation_data=comp,
            has_compensation_data=has_comp, now=time.time(), timing=self.timing))
        self._step_finished(defn, saga_id, step, phase, attempt, "succeeded", started)
        return output

    def _check_output(self, step: str, output: Any, comp: Any, has_comp: bool) -> None:
        limit = self.settings.max_payload_bytes
        payload.check_output(output, f"output of step {step!r}", max_bytes=limit)
        if has_comp:
            payload.check_value(comp, f"compensation_data of step {step!r}", max_bytes=limit)

    def _record_failure(self, defn: Saga, saga_id: str, step: str, phase: Phase,
                        attempt: int, exc: Exception, started: float) -> None:
        """Store a failed attempt; never raises, so the body's own error reaches Celery.

        Stores make any text storable (stores/sanitize.py). Should the write still
        fail for a reason other than an outage (a driver refusing some value), it is
        tried once more with only the error's type: a failure that is not stored
        would leave the step RUNNING until its lease expires, and the cause lost.
        """
        try:
            self._store_failure(saga_id, step, phase, attempt, exc,
                                engine.describe_error(exc))
        except Exception as first:
            log.exception("saga %s step %s %s attempt %s: could not store its failure; "
                          "storing its type only", saga_id, step, phase, attempt)
            fallback = (f"{type(exc).__name__} (its message could not be stored: "
                        f"{type(first).__name__})")
            try:
                self._store_failure(saga_id, step, phase, attempt, exc, fallback)
            except Exception:
                log.exception("saga %s step %s: could not store its failure; the sweeper "
                              "retries the step when its lease expires", saga_id, step)
        self._step_finished(defn, saga_id, step, phase, attempt, "failed", started)

    def _store_failure(self, saga_id: str, step: str, phase: Phase, attempt: int,
                       exc: Exception, error: str) -> None:
        reason = "timeout" if isinstance(exc, SoftTimeLimitExceeded) else "error"
        if phase is Phase.COMPENSATE:
            self.transact(saga_id, lambda d, st: engine.compensation_failed(
                d, st, step, attempt, error=error, reason=reason, now=time.time(),
                timing=self.timing))
        else:
            permanent = isinstance(exc, StepFailure)
            comp = exc.compensation_data if isinstance(exc, StepFailure) else None
            has_comp = isinstance(exc, StepFailure) and exc.has_compensation_data
            if has_comp:
                try:
                    payload.check_value(comp, f"compensation_data of step {step!r}",
                                        max_bytes=self.settings.max_payload_bytes)
                except InputError as bad:
                    error, comp, has_comp = f"{error}\n(and {bad})", None, False
            self.transact(saga_id, lambda d, st: engine.step_failed(
                d, st, step, attempt, error=error, permanent=permanent, reason=reason,
                compensation_data=comp, has_compensation_data=has_comp, now=time.time(),
                timing=self.timing))

    def _step_finished(self, defn: Saga, saga_id: str, step: str, phase: Phase, attempt: int,
                       outcome: str, started: float) -> None:
        signals.step_finished.send(sender=self, saga_id=saga_id, name=defn.name, step=step,
                                   phase=phase, attempt=attempt, outcome=outcome,
                                   duration=time.monotonic() - started)

    def _refuse_unknown_definition(self, meta: dict[str, Any], defn: Saga | None) -> None:
        why = ("not defined in this worker" if defn is None else
               f"defined here with fingerprint {defn.fingerprint}, the saga was started with "
               f"{meta.get('fingerprint')}")
        log.error("saga %s (%s): step %s not run: the definition is %s; deploy the same "
                  "code to every worker", meta.get("saga_id"), meta.get("saga"),
                  meta.get("step"), why)
        event = Event(str(meta["saga_id"]), "definition_mismatch", time.time(),
                      str(meta.get("step")), int(meta.get("attempt", 0)),
                      str(meta.get("phase")),
                      {"worker_fingerprint": getattr(defn, "fingerprint", None),
                       "saga_fingerprint": meta.get("fingerprint"), "pid": os.getpid()})
        try:
            self.store.transact(event.saga_id, lambda st: recovery.refused_message(
                st, event, Phase(str(meta.get("phase"))), timing=self.timing))
        except Exception:
            log.exception("could not record the definition mismatch")

    def claim_owner(self) -> Owner | None:
        """Who claims a step in this process: None outside a worker (the lease alone then)."""
        if self.worker_node is None or self.worker_boot is None:
            return None
        return Owner(self.worker_node, self.worker_boot, os.getpid())
    def delayed_publisher(self) -> DelayedPublisher:
        pid = os.getpid()
        if self._delayed is None or self._delayed.pid != pid:
            with self._lock:
                if self._delayed is None or self._delayed.pid != pid:
                    self._delayed = DelayedPublisher(self._publish_due)
        return self._delayed

    def _publish_due(self, d: Dispatch) -> None:
        self.publish([replace(d, countdown=0.0)])

    def heartbeat(self) -> Heartbeat:
        if self._heartbeat is None:
            with self._lock:
                if self._heartbeat is None:
                    self._heartbeat = Heartbeat(self.store, self.settings.lease)
        return self._heartbeat


class Heartbeat:
    """Renews the leases of the claims this process is running, every lease/3 seconds.

    A step may run longer than the lease; only a worker that stops (killed, frozen,
    partitioned from the store) lets its leases expire.
    """

    def __init__(self, store: Store, lease: float):
        self.store = store
        self.lease = lease
        self._claims: dict[int, tuple[str, str, Phase, int]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, saga_id: str, step: str, phase: Phase, attempt: int) -> int:
        with self._lock:
            self._next += 1
            self._claims[self._next] = (saga_id, step, phase, attempt)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sagaline-heartbeat",
                                                daemon=True)
                self._thread.start()
            return self._next

    def remove(self, token: int) -> None:
        with self._lock:
            self._claims.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.lease / 3)
            with self._lock:
                claims = list(self._claims.values())
            for saga_id, step, phase, attempt in claims:
                try:
                    self.store.renew_lease(saga_id, step, phase, attempt,
                                           time.time() + self.lease)
                except Exception:
                    log.warning("could not renew the lease of saga %s step %s", saga_id, step,
                                exc_info=True)


class DelayedPublisher:
    """Publishes the messages of retries when their backoff has passed, from one thread.

    sagaline never gives a message a broker ETA (Celery's countdown): a worker holds
    such a message unacknowledged in memory until it is due; on a quorum queue it
    then takes a prefetch slot that Celery cannot give back (per-consumer QoS), so a
    few waiting retries stall the worker; on Redis one that waits longer than the
    visibility timeout is delivered again. The wait lives here instead, with nothing
    taken from the broker, and the step's due time in the store (backoff +
    `redispatch_after`) is the durable copy: if this process ends first, the sweeper
    publishes the message then.
    """

    def __init__(self, publish: Callable[[Dispatch], None]):
        self.pid = os.getpid()
        self._publish = publish
        self._queue: list[tuple[float, int, Dispatch]] = []
        self._seq = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, d: Dispatch) -> None:
        with self._wake:
            self._seq += 1
            heapq.heappush(self._queue, (time.monotonic() + d.countdown, self._seq, d))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="sagaline-delayed-publish")
                self._thread.start()
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue or self._queue[0][0] > time.monotonic():
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._wake.wait(wait)
                _, _, d = heapq.heappop(self._queue)
            try:
                self._publish(d)  # logs its own failures; the sweeper covers them
            except Exception:
                log.exception("delayed publish of saga %s step %s failed", d.saga_id, d.step)


def child_saga_id(parent_id: str, step: str, attempt: int) -> str:
    """The id of the child saga that a parent step's attempt runs: derived, so idempotent."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sagaline:{parent_id}:{step}:{attempt}"))


def child_of(parent_id: str, rec: StepRecord) -> str:
    """The child saga a parent step ran: recorded when it completed, else derived."""
    data = rec.compensation_data if isinstance(rec.compensation_data, dict) else {}
    return str(data.get("child_saga_id") or child_saga_id(parent_id, rec.name, rec.attempt))


class SagaHandle:
    """A started saga. Its status is always read from the store."""

    def __init__(self, runtime: Runtime, saga_id: str, name: str):
        self.runtime = runtime
        self.saga_id = saga_id
        self.name = name

    def record(self) -> SagaRecord:
        saga = self.runtime.store.get_saga(self.saga_id)
        if saga is None:
            raise SagaNotFound(self.saga_id)
        return saga

    @property
    def status(self) -> SagaStatus:
        return self.record().status

    def get(self, timeout: float | None = None, *, interval: float = 0.002,
            max_interval: float = 0.1, fast_for: float = 1.0) -> Any:
        """Wait for the saga to end and return its final context.

        Raises SagaCompensated or SagaFailed (with the cause) when it did not complete,
        SagaTimeout when `timeout` seconds pass first.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            saga = self.record()
            if saga.status in SAGA_TERMINAL:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SagaTimeout(self.saga_id, timeout or 0, saga.status.value)
            time.sleep(interval)
            # Poll every few ms while most sagas end (the first `fast_for` seconds),
            # then back off so that long sagas cost the store little.
            cap = min(0.005, max_interval) if now - started < fast_for else max_interval
            interval = min(interval * 1.5, cap)
        if saga.status is SagaStatus.COMPLETED:
            return saga.output
        if saga.status is SagaStatus.COMPENSATED:
            raise SagaCompensated(saga.saga_id, saga.error, step=saga.failed_step, record=saga)
        failures = {s.name: engine.first_line(s.comp_error) or "no error recorded"
                    for s in self.runtime.store.get_steps(self.saga_id)
                    if s.comp_status is CompensationStatus.COMPENSATION_FAILED}
        raise SagaFailed(saga.saga_id, saga.error, step=saga.failed_step, record=saga,
                         compensation_failures=failures)

    def __repr__(self) -> str:
        return f"<SagaHandle {self.name} {self.saga_id}>"
