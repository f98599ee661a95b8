"""When a worker acknowledges a saga step's message: once the step has ended, not before.

By default Celery acknowledges a message as soon as a pool process starts it, and
`acks_late` is a setting of the whole task. For a saga step that early ack leaves
two windows where a kill -9 loses work that nobody knows is lost until the
sweeper's `redispatch_after`: the message acknowledged but the claim not yet
committed (the step stays DISPATCHED, its message gone), and a completion
committed but the messages it dispatched not yet published.

So the acknowledgement of a message that carries sagaline's header waits until
the task has returned or failed: a process killed before that leaves the message
unacknowledged, and the broker delivers it again (RabbitMQ as soon as the
connection drops; on Redis the restarted worker puts it back, see prefetched.py).
The claim fences the copy: it runs only if the step was never claimed; a copy of a
step that has moved on makes the worker publish again what the step's saga has
dispatched (`recovery.republish_pending`). Messages of the same tasks without the
header (the task called outside a saga) are acknowledged as Celery would.

When only a pool process dies, its worker's main process settles the step at
once, before it acknowledges the message (`recovery.message_lost`), instead of
rejecting it back to the queue (`reject_on_worker_lost`): no message is requeued
in a loop, and nothing counts against a quorum queue's delivery limit.

It is done through Celery's own extension point, the task's `Request` class: each
task's class gets a subclass of its own that adds this.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[import-untyped]
from celery import bootsteps
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from kombu.utils.objects import cached_property

from . import recovery
from ._state import current_runtime
from .context import about_saga
from .records import HEADER, Owner
from .states import Phase

log = logging.getLogger("sagaline")

# What a request's failure is when its pool process is gone.
_PROCESS_GONE = (WorkerLostError, SystemExit, KeyboardInterrupt)


class StepRequestMixin:
    """Holds the acknowledgement of a saga step's message until the task ended."""

    _sagaline_holds_acks = True
    _ack_held = False
    _held_qos: Any = None

    # Celery's request classes, which this class is mixed into, provide these.
    _request_dict: dict[str, Any]
    acknowledged: bool
    worker_pid: int | None
    task: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The worker derives a class per task from this one (create_request_cls), with
        # an on_success of its own that acknowledges only for acks_late tasks: wrap it.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("on_success")
        if own is not None and not getattr(own, "_sagaline_releases", False):

            def on_success(self: StepRequestMixin, *args: Any, **kw: Any) -> Any:
                try:
                    return own(self, *args, **kw)
                finally:
                    self._release_ack()

            on_success._sagaline_releases = True  # type: ignore[attr-defined]
            cls.on_success = on_success  # type: ignore[method-assign]

    @cached_property
    def saga_meta(self) -> dict[str, Any] | None:
        meta = self._request_dict.get(HEADER)
        return meta if isinstance(meta, dict) else None

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        if self.saga_meta is not None and not self.task.acks_late:
            self._ack_held = True
            self._held_qos = _take_prefetch_slot()
        super().on_accepted(pid, time_accepted)  # type: ignore[misc]

    def acknowledge(self) -> None:
        if self._ack_held:
            return  # released when the task has ended
        super().acknowledge()  # type: ignore[misc]

    def _release_ack(self) -> None:
        if self._ack_held:
            self._ack_held = False
            _give_back_prefetch_slot(self._held_qos)
            self.acknowledge()

    def on_success(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().on_success(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._release_ack()

    def on_failure(self, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().on_failure(exc_info, *args, **kwargs)  # type: ignore[misc]
        finally:
            exc = getattr(exc_info, "exception", None)
            if isinstance(exc, ExceptionWithTraceback):
                exc = exc.exc
            if isinstance(exc, (*_PROCESS_GONE, TimeLimitExceeded)):
                self._process_gone(exc)
            self._release_ack()  # only now: what the process left is settled

    def _process_gone(self, exc: BaseException) -> None:
        """The pool process that ran this request is gone: settle its step, then wake
        the sweeper thread to look for any other claim of a dead process."""
        try:
            runtime = current_runtime(self.task.app)
        except Exception:
            return
        meta = self.saga_meta
        if meta is not None and isinstance(exc, _PROCESS_GONE):
            settle_lost_message(runtime, meta, self.worker_pid)
        runtime.process_lost.set()


def settle_lost_message(runtime: Any, meta: dict[str, Any], pid: int | None) -> None:
    """Put right what a dead pool process left of the step whose message it had taken."""
    try:
        saga_id, step = str(meta["saga_id"]), str(meta["step"])
        phase, attempt = Phase(meta["phase"]), int(meta["attempt"])
    except (KeyError, TypeError, ValueError):
        return
    node, boot = runtime.worker_node, runtime.worker_boot
    owner = Owner(node, boot, pid) if node and boot and pid else None
    cause = f"process {pid} of worker {node} exited while running it"
    with about_saga(saga_id, meta.get("saga"), step, phase, attempt):
        _settle(runtime, saga_id, step, phase, attempt, owner, cause, pid)


def _settle(
    runtime: Any,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    owner: Owner | None,
    cause: str,
    pid: int | None,
) -> None:
    try:
        decision = runtime.apply(
            saga_id, recovery.message_lost, step, phase, attempt, owner, cause=cause
        )
    except Exception:
        log.exception(
            "saga %s step %s: could not settle what its dead pool process left; the sweeper will",
            saga_id,
            step,
        )
        return
    if decision is not None:
        log.warning(
            "saga %s step %s (%s attempt %s): the pool process that took its message "
            "(pid %s) died; %s",
            saga_id,
            step,
            phase,
            attempt,
            pid,
            "running it again" if decision.dispatches else "settled",
        )


# -- prefetch: a running step does not take the place of a prefetched message ----------
#
# The broker counts an unacknowledged message against the consumer's prefetch
# (worker_prefetch_multiplier x concurrency). With early acks a running task no longer
# counts; a step whose ack is held would, and the worker would prefetch that much less.
# So each held ack raises the prefetch by one until it is released, as Celery itself
# does for the messages it holds for their ETA (strategy.py). On RabbitMQ quorum queues
# (per-consumer prefetch) the broker ignores such changes: there a running step counts.

_consumer: Any = None


def _take_prefetch_slot() -> Any:
    qos = getattr(_consumer, "qos", None)
    if qos is not None:
        qos.increment_eventually()
    return qos


def _give_back_prefetch_slot(qos: Any) -> None:
    # Only to the QoS it was taken from: a consumer that reconnected starts afresh.
    current: Any = getattr(_consumer, "qos", None)
    if qos is not None and current is qos:
        current.decrement_eventually()


class HeldAcksStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Lets held acks adjust the prefetch of the worker's consumer (main process)."""

    label = "sagaline held acks"

    def __init__(self, consumer: Any, **kwargs: Any):
        global _consumer
        _consumer = consumer
        super().__init__(consumer, **kwargs)


_CLASSES: dict[Any, type] = {}


def step_request_class(base: Any) -> type:
    """`base` (a task's Request class, or its dotted name) with StepRequestMixin."""
    from celery.utils.imports import symbol_by_name

    cls = symbol_by_name(base)
    if getattr(cls, "_sagaline_holds_acks", False):
        return cls  # type: ignore[no-any-return]
    try:
        return _CLASSES[cls]
    except KeyError:
        made = type(
            f"Step{cls.__name__}",
            (StepRequestMixin, cls),
            {"__module__": __name__, "__doc__": cls.__doc__},
        )
        _CLASSES[cls] = made
        return made
