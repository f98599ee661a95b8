"""Running one step message in a worker: claim, heartbeat, body, completion or failure."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, SoftTimeLimitExceeded

from . import engine, payload, recovery, signals
from ._state import registered_saga
from .context import SagaLogFields, StepInfo, _about, _current
from .definition import Saga
from .exceptions import InputError, StepFailure
from .leases import Heartbeat as Heartbeat  # re-exported
from .leases import claim_owner as claim_owner  # also re-exported
from .outbox import step as step_tx
from .records import Event
from .signatures import accepted_kwargs as accepted_kwargs  # re-exported
from .signatures import filter_kwargs as filter_kwargs  # also re-exported
from .states import EventKind, FailureReason, Phase
from .steps import StepResponse

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("sagaline")


def execute(
    runtime: Runtime,
    task: Any,
    body: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    meta: dict[str, Any],
) -> Any:
    """Run the step (or compensation) that a message with sagaline header `meta` names,
    if this process wins its claim, and record the outcome; Celery's step hook calls it."""
    saga_id, step = str(meta["saga_id"]), str(meta["step"])
    phase, attempt = Phase(meta["phase"]), int(meta["attempt"])
    # What sagaline logs about this message (a refused claim, say) names the attempt.
    about = _about.set(SagaLogFields(saga_id, str(meta["saga"]), step, attempt, phase.value))
    try:
        return _execute(runtime, task, body, args, kwargs, meta, saga_id, step, phase, attempt)
    finally:
        _about.reset(about)


def _execute(
    runtime: Runtime,
    task: Any,
    body: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
) -> Any:
    defn = registered_saga(str(meta["saga"]))
    if defn is None or defn.fingerprint != meta.get("fingerprint"):
        _refuse_unknown_definition(runtime, meta, defn)
        raise Ignore()
    now = runtime.now()
    lease = runtime.settings.lease
    if not runtime.store.claim_step(
        saga_id, step, phase, attempt, lease_until=now + lease, now=now, owner=claim_owner(runtime)
    ):
        log.info(
            "saga %s step %s %s attempt %s: claim refused (duplicate or stale "
            "message); not running it",
            saga_id,
            step,
            phase,
            attempt,
        )
        if _redelivered(task):
            _republish_pending(runtime, saga_id, step, phase, attempt)
        raise Ignore()
    ready_at = meta.get("ready_at")
    wait = now - ready_at if isinstance(ready_at, (int, float)) else None
    signals.step_started.send(
        sender=runtime,
        saga_id=saga_id,
        name=defn.name,
        step=step,
        phase=phase,
        attempt=attempt,
        queue_wait=wait,
    )
    heartbeat = runtime.heartbeat()
    token = heartbeat.add(saga_id, step, phase, attempt)
    info = StepInfo(saga_id, defn.name, step, attempt, phase)
    ctx_token = _current.set(info)
    tx_token = step_tx.enter(runtime, info)
    kwargs = filter_kwargs(task.run, kwargs)
    tracing = runtime.tracing
    try:
        # The attempt's span covers the body and the completion (observability/tracing.py).
        with tracing.attempt(meta, task) if tracing is not None else contextlib.nullcontext():
            return _run_and_complete(
                runtime, defn, body, args, kwargs, saga_id, step, phase, attempt
            )
    finally:
        # Renewed until the completion committed: a store outage during completion
        # must not let the lease expire and re-run a body that already finished.
        heartbeat.remove(token)
        step_tx.leave(tx_token)
        _current.reset(ctx_token)


def _redelivered(task: Any) -> bool:
    info = getattr(getattr(task, "request", None), "delivery_info", None)
    return bool(isinstance(info, dict) and info.get("redelivered"))


def _republish_pending(
    runtime: Runtime, saga_id: str, step: str, phase: Phase, attempt: int
) -> None:
    """A message the broker delivered again, of a step that has moved on: the process
    that had it may have died after committing its completion and before publishing
    what the completion dispatched (acking.py). Publish those again now (fenced)."""
    try:
        runtime.apply(
            saga_id,
            recovery.message_lost,
            step,
            phase,
            attempt,
            None,
            cause="message redelivered",
            reason="message_redelivered",
        )
    except Exception:
        log.exception(
            "saga %s: could not publish its pending messages again; the sweeper will", saga_id
        )


def _run_and_complete(
    runtime: Runtime,
    defn: Saga,
    body: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
) -> Any:
    started = time.monotonic()
    try:
        result = body(*args, **kwargs)
    except Exception as exc:
        step_tx.abandon()  # a step transaction it opened commits nothing
        if isinstance(exc, Ignore):
            raise
        _record_failure(runtime, defn, saga_id, step, phase, attempt, exc, started)
        raise
    if phase is Phase.COMPENSATE:
        _complete(
            runtime, defn, saga_id, step, phase, attempt, started, engine.compensation_succeeded
        )
        _step_finished(runtime, defn, saga_id, step, phase, attempt, "succeeded", started)
        return None
    if isinstance(result, StepResponse):
        output, comp, has_comp = (
            result.output,
            result.compensation_data,
            result.has_compensation_data,
        )
    else:
        output, comp, has_comp = result, None, False
    try:
        _check_output(runtime, step, output, comp, has_comp)
    except InputError as exc:
        step_tx.abandon()
        # Retrying would produce the same value: fail permanently (and compensate).
        runtime.apply(
            saga_id,
            engine.step_failed,
            step,
            attempt,
            error=f"InputError: {exc}",
            permanent=True,
            reason=FailureReason.PAYLOAD_REFUSED,
        )
        _step_finished(runtime, defn, saga_id, step, phase, attempt, "failed", started)
        raise InputError(str(exc), rule=exc.rule, where=exc.where) from None
    _complete(
        runtime,
        defn,
        saga_id,
        step,
        phase,
        attempt,
        started,
        engine.step_succeeded,
        output=output,
        compensation_data=comp,
        has_compensation_data=has_comp,
    )
    _step_finished(runtime, defn, saga_id, step, phase, attempt, "succeeded", started)
    return output


def _complete(
    runtime: Runtime,
    defn: Saga,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    started: float,
    decide: Callable[..., Any],
    **kwargs: Any,
) -> None:
    """Record a success: in the step's own transaction when the body opened one
    (sagaline.step_transaction), so that its writes commit with the completion."""
    if not step_tx.is_open():
        runtime.apply(saga_id, decide, step, attempt, **kwargs)
        return
    try:
        step_tx.commit(runtime, saga_id, decide, step, attempt, **kwargs)
    except Exception as exc:
        # The commit failed (a deadlock, a deferred constraint, an outage): nothing of
        # the attempt stayed, so it fails like its body would have, and is retried.
        _record_failure(runtime, defn, saga_id, step, phase, attempt, exc, started)
        raise


def _check_output(runtime: Runtime, step: str, output: Any, comp: Any, has_comp: bool) -> None:
    limit = runtime.settings.max_payload_bytes
    payload.check_output(output, f"output of step {step!r}", max_bytes=limit)
    if has_comp:
        payload.check_value(comp, f"compensation_data of step {step!r}", max_bytes=limit)


def _record_failure(
    runtime: Runtime,
    defn: Saga,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    exc: Exception,
    started: float,
) -> None:
    """Store a failed attempt; never raises, so the body's own error reaches Celery.

    Stores make any text storable (stores/sanitize.py). Should the write still
    fail for a reason other than an outage (a driver refusing some value), it is
    tried once more with only the error's type: a failure that is not stored
    would leave the step RUNNING until its lease expires, and the cause lost.
    """
    try:
        _store_failure(runtime, saga_id, step, phase, attempt, exc, engine.describe_error(exc))
    except Exception as first:
        log.exception(
            "saga %s step %s %s attempt %s: could not store its failure; storing its type only",
            saga_id,
            step,
            phase,
            attempt,
        )
        fallback = f"{type(exc).__name__} (its message could not be stored: {type(first).__name__})"
        try:
            _store_failure(runtime, saga_id, step, phase, attempt, exc, fallback)
        except Exception:
            log.exception(
                "saga %s step %s: could not store its failure; the sweeper "
                "retries the step when its lease expires",
                saga_id,
                step,
            )
    _step_finished(runtime, defn, saga_id, step, phase, attempt, "failed", started)


def _store_failure(
    runtime: Runtime,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    exc: Exception,
    error: str,
) -> None:
    reason = (
        FailureReason.TIMEOUT if isinstance(exc, SoftTimeLimitExceeded) else FailureReason.ERROR
    )
    if phase is Phase.COMPENSATE:
        runtime.apply(
            saga_id, engine.compensation_failed, step, attempt, error=error, reason=reason
        )
        return
    permanent = isinstance(exc, StepFailure)
    comp = exc.compensation_data if isinstance(exc, StepFailure) else None
    has_comp = isinstance(exc, StepFailure) and exc.has_compensation_data
    if has_comp:
        try:
            payload.check_value(
                comp,
                f"compensation_data of step {step!r}",
                max_bytes=runtime.settings.max_payload_bytes,
            )
        except InputError as bad:
            error, comp, has_comp = f"{error}\n(and {bad})", None, False
    runtime.apply(
        saga_id,
        engine.step_failed,
        step,
        attempt,
        error=error,
        permanent=permanent,
        reason=reason,
        compensation_data=comp,
        has_compensation_data=has_comp,
    )


def _step_finished(
    runtime: Runtime,
    defn: Saga,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    outcome: str,
    started: float,
) -> None:
    signals.step_finished.send(
        sender=runtime,
        saga_id=saga_id,
        name=defn.name,
        step=step,
        phase=phase,
        attempt=attempt,
        outcome=outcome,
        duration=time.monotonic() - started,
    )


def _refuse_unknown_definition(runtime: Runtime, meta: dict[str, Any], defn: Saga | None) -> None:
    why = (
        "not defined in this worker"
        if defn is None
        else f"defined here with fingerprint {defn.fingerprint}, the saga was started with "
        f"{meta.get('fingerprint')}"
    )
    log.error(
        "saga %s (%s): step %s not run: the definition is %s; deploy the same code to every worker",
        meta.get("saga_id"),
        meta.get("saga"),
        meta.get("step"),
        why,
    )
    event = Event(
        str(meta["saga_id"]),
        EventKind.DEFINITION_MISMATCH,
        runtime.now(),
        str(meta.get("step")),
        int(meta.get("attempt", 0)),
        str(meta.get("phase")),
        {
            "worker_fingerprint": getattr(defn, "fingerprint", None),
            "saga_fingerprint": meta.get("fingerprint"),
            "pid": os.getpid(),
        },
    )
    try:
        runtime.store.transact(
            event.saga_id,
            lambda st: recovery.refused_message(
                st, event, Phase(str(meta.get("phase"))), timing=runtime.timing
            ),
        )
    except Exception:
        log.exception("could not record the definition mismatch")
