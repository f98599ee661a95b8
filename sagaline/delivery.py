"""Step messages that cannot be delivered: unsendable, undecodable, refused, unregistered.

A publish that fails because of the message itself, or a worker that drops a
step's message without running it, must neither stop a worker nor leave the step
DISPATCHED with the sweeper publishing it again for ever, silently. Such a step
fails at once with the reason in its history (its saga compensates; for a
compensation, the saga parks FAILED), except a message for a task the receiving
worker has not registered: another worker may have it, so it is published again
a few times (`unknown_task_redispatches`) before the step fails.

The worker side hooks into Celery where it drops messages: the `task_unknown` and
`task_rejected` signals, and (Celery sends no signal for it) a consumer bootstep
around the consumer's decode-error handler. They run in the worker's main process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.signals import task_rejected, task_unknown, worker_ready

from . import recovery
from ._state import current_runtime, registered_sagas
from .context import about_saga
from .records import HEADER, Decision, Event, SagaState
from .states import EventKind, FailureReason, Phase

if TYPE_CHECKING:
    from celery import Celery

    from .runtime import Runtime

log = logging.getLogger("sagaline")


def undeliverable(exc: BaseException) -> bool:
    """Whether a publish failed because of the message itself (sending it again would
    fail the same way), rather than because the broker is unreachable."""
    from kombu.exceptions import ContentDisallowed, EncodeError

    return isinstance(
        exc, (EncodeError, ContentDisallowed, TypeError, ValueError, RecursionError, OverflowError)
    )


def fail_undeliverable(
    runtime: Runtime,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    *,
    reason: FailureReason,
    error: str,
    claimed: bool = False,
) -> Decision | None:
    """Fail a step (or compensation) whose message can never be delivered; the
    caller publishes what the decision dispatches. Never raises: it runs where an
    error has no one to go to (a publish, a worker's message consumer)."""

    def decide(state: SagaState) -> Decision | None:
        defn = runtime.definition_for(state.saga)
        if defn is None or step not in state.steps:
            return None
        return recovery.undeliverable(
            defn,
            state,
            step,
            phase,
            attempt,
            reason=reason,
            error=error,
            now=runtime.now(),
            timing=runtime.timing,
            claimed=claimed,
        )

    with about_saga(saga_id, step=step, phase=phase, attempt=attempt):
        try:
            return runtime.store.transact(saga_id, decide)
        except Exception:
            log.exception(
                "saga %s step %s: could not record that its message cannot be "
                "delivered; the sweeper will publish it again",
                saga_id,
                step,
            )
            return None


def message_refused(
    runtime: Runtime,
    meta: dict[str, Any],
    *,
    task: str,
    worker: str,
    unregistered: bool,
    error: str,
) -> None:
    """A worker dropped a step's message without running it.

    Unregistered task: recorded, and the sweeper publishes it again (another worker
    may have the task) until `unknown_task_redispatches`; anything else (an
    undecodable or invalid message) fails the step at once.
    """
    try:
        saga_id, step = str(meta["saga_id"]), str(meta["step"])
        phase, attempt = Phase(meta["phase"]), int(meta["attempt"])
    except (KeyError, TypeError, ValueError):
        log.error("a message with a malformed sagaline header was dropped: %r", meta)
        return
    with about_saga(saga_id, meta.get("saga"), step, phase, attempt):
        _message_refused(runtime, saga_id, step, phase, attempt, task, worker, unregistered, error)


def _message_refused(
    runtime: Runtime,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    task: str,
    worker: str,
    unregistered: bool,
    error: str,
) -> None:
    log.error(
        "saga %s step %s %s attempt %s: worker %s dropped its message: %s",
        saga_id,
        step,
        phase,
        attempt,
        worker,
        error,
    )
    if not unregistered:
        decision = fail_undeliverable(
            runtime,
            saga_id,
            step,
            phase,
            attempt,
            reason=FailureReason.MESSAGE_UNDELIVERABLE,
            error=error,
        )
    else:
        event = Event(
            saga_id,
            EventKind.TASK_UNREGISTERED,
            runtime.now(),
            step,
            attempt,
            phase.value,
            {"task": task, "worker": worker, "error": error},
        )

        def decide(state: SagaState) -> Decision | None:
            defn = runtime.definition_for(state.saga)
            if defn is None:
                return Decision(events=[event])
            return recovery.unregistered_task(
                defn,
                state,
                event,
                phase,
                max_redispatches=runtime.settings.unknown_task_redispatches,
                now=runtime.now(),
                timing=runtime.timing,
            )

        try:
            decision = runtime.store.transact(saga_id, decide)
        except Exception:
            log.exception("saga %s step %s: could not record the refused message", saga_id, step)
            return
    if decision is not None:
        runtime.after_commit(decision)


# -- Celery's side: where a worker drops messages ---------------------------------------------


def _saga_meta(message: Any) -> dict[str, Any] | None:
    headers = getattr(message, "headers", None)
    meta = headers.get(HEADER) if isinstance(headers, dict) else None
    return meta if isinstance(meta, dict) else None


def _refused(consumer: Any, message: Any, *, unregistered: bool, error: str) -> None:
    meta = _saga_meta(message)
    if meta is None:
        return  # not a saga step: Celery's own handling is all there is to do
    try:
        runtime = current_runtime(getattr(consumer, "app", None))
    except Exception:
        return
    headers = getattr(message, "headers", None) or {}
    message_refused(
        runtime,
        meta,
        task=str(headers.get("task")),
        worker=str(getattr(consumer, "hostname", None) or "a worker"),
        unregistered=unregistered,
        error=error,
    )


@task_unknown.connect(weak=False)  # type: ignore[untyped-decorator]
def _step_task_unknown(
    sender: Any = None, message: Any = None, name: str | None = None, **_: Any
) -> None:
    _refused(
        sender, message, unregistered=True, error=f"task {name!r} is not registered in this worker"
    )


@task_rejected.connect(weak=False)  # type: ignore[untyped-decorator]
def _step_message_rejected(
    sender: Any = None, message: Any = None, exc: Any = None, **_: Any
) -> None:
    why = "not a task message Celery understands" if exc is None else f"{type(exc).__name__}: {exc}"
    _refused(sender, message, unregistered=False, error=f"message rejected by the worker: {why}")


class DecodeErrorStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Records a step message that reaches a worker undecodable, then lets Celery
    log and drop it as usual.

    Celery sends no signal for a decode error: it calls the consumer's
    `on_decode_error`, which this step wraps on the consumer instance before the
    task consumer is created. A message's headers travel outside its body, so the
    saga, step and attempt are known even when the body cannot be read.
    """

    label = "sagaline decode errors"

    def __init__(self, consumer: Any, **kwargs: Any):
        original = consumer.on_decode_error

        def on_decode_error(message: Any, exc: Exception) -> None:
            try:
                _refused(
                    consumer,
                    message,
                    unregistered=False,
                    error=f"message undecodable: {type(exc).__name__}: {exc}",
                )
            except Exception:
                log.exception("could not record an undecodable step message")
            original(message, exc)

        consumer.on_decode_error = on_decode_error
        super().__init__(consumer, **kwargs)


@worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
def _warn_unknown_step_tasks(sender: Any = None, **_: Any) -> None:
    """Name every step task of the registered sagas that this worker does not have.

    Checked when the worker is ready rather than in `init_app`: only then has the
    worker imported every module of the app (`include`, autodiscovery), while a
    client process may legitimately never import the tasks it only sends.
    """
    app = getattr(sender, "app", None)
    if app is None or getattr(app, "_sagaline_runtime", None) is None:
        return
    for message in unknown_step_tasks(app):
        log.warning("%s", message)


def unknown_step_tasks(app: Celery) -> list[str]:
    """One line per step task or compensation of a registered saga that `app` lacks."""
    known = set(app.tasks.keys())
    missing = []
    for defn in registered_sagas():
        for spec in defn.graph.steps.values():
            for role, name in (("task", spec.task_name), ("compensation", spec.compensation_name)):
                if spec.child is None and name and name not in known:
                    missing.append(
                        f"saga {defn.name!r} step {spec.name!r}: {role} {name!r} "
                        f"is not registered in this worker; its messages will be "
                        f"refused here"
                    )
    return missing
