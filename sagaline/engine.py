"""Pure saga decisions: (definition, state, event) -> Decision. No I/O happens here.

Every function takes the saga's current state (read under its lock by the store),
works on a copy, and returns the records to write, the history events to append
and the Celery messages to publish after commit. Stale events (a completion for
an attempt that is no longer the running one) decide nothing.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import payload
from .definition import Saga
from .exceptions import InputError
from .records import Decision, Dispatch, Event, SagaRecord, SagaState, StepRecord
from .states import (
    COMPENSATION_IN_FLIGHT,
    COMPENSATION_TRANSITIONS,
    SAGA_TRANSITIONS,
    STEP_IN_FLIGHT,
    STEP_TRANSITIONS,
    CompensationStatus,
    FailureStrategy,
    Phase,
    SagaStatus,
    StepStatus,
)
from .steps import Step, StepKind

# Why an attempt ended with its outcome unknown (its process died mid-run): its lease
# expired, or the worker that ran it saw the process die (a pool process exited, the
# worker restarted). Such an attempt may have applied its effect and does not count
# as a business failure (crash_retries).
CRASH_REASONS = frozenset({"lease_expired", "worker_lost"})


@dataclass(frozen=True)
class Timing:
    """Engine knobs, from the settings (config.py)."""

    redispatch_after: float = 30.0
    # A step whose worker died (lease expired) is run again this many extra times
    # before it counts as failed: a crash is not a business failure.
    crash_retries: int = 3
    # The largest JSON document a message may carry (payload.py).
    max_payload_bytes: int = payload.DEFAULT_MAX_BYTES


class Work:
    """A mutable copy of a saga's state that collects what changed."""

    def __init__(self, defn: Saga, state: SagaState, now: float, timing: Timing):
        self.defn = defn
        self.graph = defn.graph
        self.now = now
        self.timing = timing
        self.saga = replace(state.saga)
        self.steps = {n: replace(s) for n, s in state.steps.items()}
        self.orig = state
        self.saga_changed = False
        self.changed: set[str] = set()
        self.events: list[Event] = []
        self.dispatches: list[Dispatch] = []

    # -- recording ---------------------------------------------------------------

    def event(self, kind: str, step: str | None = None, attempt: int | None = None,
              phase: Phase | None = None, **detail: Any) -> None:
        self.events.append(Event(self.saga.saga_id, kind, self.now, step, attempt,
                                 None if phase is None else phase.value, detail))

    def update_step(self, name: str, **fields: Any) -> StepRecord:
        rec = self.steps[name]
        check_transition(STEP_TRANSITIONS, rec.status, fields.get("status", rec.status),
                         f"step {name!r}")
        check_transition(COMPENSATION_TRANSITIONS, rec.comp_status,
                         fields.get("comp_status", rec.comp_status),
                         f"compensation of {name!r}")
        for k, v in fields.items():
            setattr(rec, k, v)
        self.changed.add(name)
        return rec

    def update_saga(self, **fields: Any) -> None:
        check_transition(SAGA_TRANSITIONS, self.saga.status,
                         fields.get("status", self.saga.status), "saga")
        for k, v in fields.items():
            setattr(self.saga, k, v)
        self.saga.updated_at = self.now
        self.saga_changed = True

    def decision(self) -> Decision:
        return Decision(
            saga=self.saga if self.saga_changed else None,
            steps=sorted((self.steps[n] for n in self.changed), key=lambda r: r.position),
            events=self.events,
            dispatches=self.dispatches,
            saga_version=self.orig.saga.version,
            step_versions={n: self.orig.steps[n].version for n in self.changed},
        )

    # -- context -----------------------------------------------------------------

    def context_for(self, name: str) -> dict[str, Any]:
        """Saga input merged with the outputs of the step's ancestors, in topological order."""
        ctx = dict(self.saga.input)
        for a in self.graph.ancestors[name]:
            merge_output(ctx, a, self.steps[a])
        ctx["saga_id"] = self.saga.saga_id
        return ctx

    def final_context(self) -> dict[str, Any]:
        ctx = dict(self.saga.input)
        for n in self.graph.order:
            merge_output(ctx, n, self.steps[n])
        return ctx

    def pivot_passed(self) -> bool:
        return any(self.graph.steps[n].pivot and self.steps[n].status is StepStatus.SUCCEEDED
                   for n in self.graph.order)


def check_transition(table: Mapping[Any, frozenset[Any]], old: Any, new: Any,
                     what: str) -> None:
    """The engine only makes moves the tables of states.py allow (a guard against its bugs)."""
    if new != old and new not in table.get(old, frozenset()):
        raise RuntimeError(f"sagaline engine bug: {what} cannot go from {old} to {new}")


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What `after` adds to or changes in `before` (saga_id aside): an output to merge."""
    return {k: v for k, v in after.items()
            if k != "saga_id" and (k not in before or before[k] != v)}


def saga_result(w: Work) -> Any:
    """The final context, or what a functional saga returned (see functional.py)."""
    spec = w.defn.result_spec
    if spec is None:
        return w.final_context()

    def resolve(ref: list[str | None]) -> Any:
        step, key = ref
        value: Any = w.saga.input if step is None else w.steps[step].output
        if key is not None:
            return value.get(key) if isinstance(value, dict) else None
        return value

    if isinstance(spec, dict):
        return {k: resolve(v) for k, v in spec.items()}
    return resolve(spec)


def merge_output(ctx: dict[str, Any], name: str, rec: StepRecord) -> None:
    if rec.status is not StepStatus.SUCCEEDED or rec.output is None:
        return
    if isinstance(rec.output, dict):
        ctx.update(rec.output)
    else:
        ctx[name] = rec.output


def describe_error(exc: BaseException) -> str:
    """`Type: message` followed by the traceback, as stored in step records and history."""
    head = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return head if not exc.__traceback__ else f"{head}\n{tb}"


def first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]


# -- starting ----------------------------------------------------------------------


def start(defn: Saga, saga_id: str, input: dict[str, Any], *, now: float, timing: Timing,
          idempotency_key: str | None = None, parent_saga_id: str | None = None,
          parent_step: str | None = None,
          input_fingerprint: str | None = None,
          trace_context: str | None = None) -> tuple[SagaState, Decision]:
    """The new saga, its steps, and the root steps dispatched: written in one transaction."""
    graph = defn.graph
    deadline = now + defn.timeout if defn.timeout else None
    saga = SagaRecord(saga_id=saga_id, name=defn.name, status=SagaStatus.RUNNING, input=input,
                      fingerprint=defn.fingerprint, created_at=now, updated_at=now,
                      idempotency_key=idempotency_key, deadline=deadline, due_at=deadline,
                      parent_saga_id=parent_saga_id, parent_step=parent_step,
                      input_fingerprint=input_fingerprint, trace_context=trace_context)
    steps = {n: StepRecord(saga_id, n, i) for i, n in enumerate(graph.order)}
    state = SagaState(saga, steps)
    w = Work(defn, state, now, timing)
    w.event("saga_started", name=defn.name, idempotency_key=idempotency_key,
            fingerprint=defn.fingerprint, deadline=deadline)
    advance(w)
    initial = SagaState(w.saga, w.steps)
    return initial, Decision(saga=w.saga, steps=list(w.steps.values()), events=w.events,
                             dispatches=w.dispatches)


# -- forward events ----------------------------------------------------------------


def step_succeeded(defn: Saga, state: SagaState, step: str, attempt: int, *, output: Any,
                   compensation_data: Any, has_compensation_data: bool, now: float,
                   timing: Timing) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.FORWARD, attempt):
        return None
    w.update_step(step, status=StepStatus.SUCCEEDED, output=output,
                  compensation_data=compensation_data if has_compensation_data else None,
                  has_compensation_data=has_compensation_data, finished_at=now,
                  lease_until=None, due_at=None)
    late = w.saga.status is not SagaStatus.RUNNING
    w.event("step_succeeded", step, attempt, Phase.FORWARD,
            **({"after_rollback_began": True} if late else {}))
    if defn.graph.steps[step].pivot and not late:
        w.event("pivot_passed", step)
    advance(w)
    return w.decision()


def step_failed(defn: Saga, state: SagaState, step: str, attempt: int, *, error: str,
                permanent: bool = False, reason: str = "error",
                compensation_data: Any = None, has_compensation_data: bool = False,
                now: float, timing: Timing) -> Decision | None:
    """A failed attempt: retry with backoff, or fail the step and roll back."""
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.FORWARD, attempt):
        return None
    fail_attempt(w, step, error=error, permanent=permanent, reason=reason,
                 compensation_data=compensation_data,
                 has_compensation_data=has_compensation_data)
    advance(w)
    return w.decision()


def fail_attempt(w: Work, name: str, *, error: str, permanent: bool, reason: str,
                 compensation_data: Any = None, has_compensation_data: bool = False) -> None:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    policy = spec.retry
    after_pivot = w.pivot_passed()
    if after_pivot and w.defn.pivot_retry.max_attempts > policy.max_attempts:
        policy = w.defn.pivot_retry
    crashed = reason in CRASH_REASONS
    allowed = policy.max_attempts + (w.timing.crash_retries if crashed else 0)
    if crashed or rec.has_compensation_data:
        # A worker died mid-run (now or in an earlier attempt): its effect may be applied.
        # The step stays "possibly applied" through retries, so that it is undone even
        # if its retry never runs; the compensation then gets compensation_data None.
        if not has_compensation_data:
            compensation_data = rec.compensation_data
        has_compensation_data = True
    if w.saga.status is SagaStatus.RUNNING and not permanent and rec.attempt < allowed:
        if crashed:
            w.update_step(name, has_compensation_data=True)
        delay = policy.delay(min(rec.attempt, policy.max_attempts))
        w.event("step_attempt_failed", name, rec.attempt, Phase.FORWARD, reason=reason,
                error=error, retry_in=round(delay, 3), retry_forward=after_pivot)
        dispatch_forward(w, name, attempt=rec.attempt + 1, countdown=delay)
        return
    w.update_step(name, status=StepStatus.FAILED, error=error, finished_at=w.now,
                  lease_until=None, due_at=None,
                  compensation_data=compensation_data if has_compensation_data else None,
                  has_compensation_data=has_compensation_data)
    w.event("step_failed", name, rec.attempt, Phase.FORWARD, reason=reason, error=error,
            permanent=permanent)
    if w.saga.status is not SagaStatus.RUNNING:
        return  # already rolling back: compensation_progress takes this step into account
    if after_pivot:
        w.update_saga(status=SagaStatus.FAILED, error=first_line(error), failed_step=name,
                      finished_at=w.now, due_at=None)
        w.event("saga_failed", name, reason="forward_retries_exhausted_after_pivot",
                error=first_line(error))
        return
    begin_compensation(w, cause=first_line(error), failed_step=name,
                       strategy=w.defn.failure_strategy)


def dispatch_forward(w: Work, name: str, *, attempt: int, countdown: float = 0.0,
                     announce: bool = True, ctx: dict[str, Any] | None = None,
                     kwargs: dict[str, Any] | None = None) -> None:
    spec = w.graph.steps[name]
    if kwargs is None:
        kwargs = step_kwargs(w, spec, w.context_for(name) if ctx is None else ctx)
    w.update_step(name, status=StepStatus.DISPATCHED, attempt=attempt, lease_until=None,
                  due_at=w.now + countdown + w.timing.redispatch_after, redispatches=0)
    if announce and attempt == 1:
        w.event("step_dispatched", name, attempt, Phase.FORWARD)
    w.dispatches.append(Dispatch(w.saga.saga_id, w.saga.name, w.saga.fingerprint, name,
                                 Phase.FORWARD, attempt, spec.task_name or "", kwargs,
                                 countdown=countdown, queue=spec.queue, timeout=spec.timeout,
                                 child_saga=spec.child.name if spec.child else None,
                                 trace_context=w.saga.trace_context))


def step_kwargs(w: Work, spec: Step, ctx: dict[str, Any]) -> dict[str, Any]:
    """What a step's message carries: its context, or what its input= mapper made of it."""
    return ctx if spec.input is None else mapped_input(spec, ctx, w.timing.max_payload_bytes)


def mapped_input(spec: Step, ctx: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    assert spec.input is not None
    mapped = spec.input(ctx)
    if not isinstance(mapped, dict):
        raise TypeError(f"input= of step {spec.name!r} must return a dict, "
                        f"got {type(mapped).__name__}")
    # saga_id is set below whatever the mapper returned (mappers often copy ctx).
    mapped = {k: v for k, v in mapped.items() if k != "saga_id"}
    payload.check_object(mapped, f"input= of step {spec.name!r}", max_bytes=max_bytes)
    return {**mapped, "saga_id": ctx["saga_id"]}


def advance(w: Work) -> None:
    """Carry the saga forward as far as it can go without running a task."""
    for _ in range(len(w.graph.order) + 2):
        if w.saga.status is SagaStatus.RUNNING:
            if not forward_progress(w):
                break
        else:
            break
    if w.saga.status is SagaStatus.RUNNING and all(
        w.steps[n].status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for n in w.graph.order
    ):
        w.update_saga(status=SagaStatus.COMPLETED, output=saga_result(w), finished_at=w.now,
                      due_at=None)
        w.event("saga_completed")
    if w.saga.status is SagaStatus.COMPENSATING:
        compensation_progress(w)


def forward_progress(w: Work) -> bool:
    """Start every step whose dependencies are done. Returns True if a step settled inline."""
    settled_inline = False
    for name in w.graph.order:
        rec = w.steps[name]
        spec = w.graph.steps[name]
        if rec.status is not StepStatus.PENDING:
            continue
        if any(w.steps[d].status not in (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
               for d in spec.depends_on):
            continue
        ctx = w.context_for(name)
        try:
            if spec.when is not None and not spec.when(ctx):
                w.update_step(name, status=StepStatus.SKIPPED, finished_at=w.now)
                w.event("step_skipped", name, reason="condition_false")
                settled_inline = True
                continue
            if spec.kind == StepKind.TRANSFORM:
                assert spec.transform is not None
                out = spec.transform(ctx)
                if not isinstance(out, dict):
                    raise TypeError(f"transform {name!r} must return a dict, "
                                    f"got {type(out).__name__}")
                diff = changed_keys(ctx, out)
                payload.check_object(diff, f"result of transform {name!r}",
                                     max_bytes=w.timing.max_payload_bytes)
                w.update_step(name, status=StepStatus.SUCCEEDED, output=diff, attempt=1,
                              started_at=w.now, finished_at=w.now)
                w.event("transform_applied", name, keys=sorted(diff))
                settled_inline = True
                continue
            kwargs = step_kwargs(w, spec, ctx)
            # Each part of the context was checked when it entered; together they
            # may still be more than a message may carry (saga_id aside, so that an
            # input just under the limit still starts).
            payload.check_size({k: v for k, v in kwargs.items() if k != "saga_id"},
                               f"context of step {name!r}",
                               max_bytes=w.timing.max_payload_bytes)
            dispatch_forward(w, name, attempt=1, ctx=ctx, kwargs=kwargs)
        except InputError as exc:  # the message it would send breaks a payload rule
            w.update_step(name, attempt=1)
            fail_attempt(w, name, error=f"InputError: {exc}", permanent=True,
                         reason="payload_refused")
            return False
        except Exception as exc:  # a user predicate, transform or input mapper raised
            w.update_step(name, attempt=1)  # settled as one attempt, failed
            fail_attempt(w, name, error=describe_error(exc), permanent=True,
                         reason="definition_callable_failed")
            return False
    return settled_inline


# -- rolling back ------------------------------------------------------------------


def begin_compensation(w: Work, *, cause: str, failed_step: str | None,
                       strategy: FailureStrategy) -> None:
    w.update_saga(status=SagaStatus.COMPENSATING, error=cause, failed_step=failed_step)
    due = None
    if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE and any(
        w.steps[n].status in STEP_IN_FLIGHT for n in w.graph.order
    ):
        due = w.now + w.defn.grace
    w.update_saga(due_at=due)
    w.event("saga_compensating", failed_step, cause=cause, strategy=strategy.value,
            grace_until=due)
    for name in w.graph.order:
        rec = w.steps[name]
        if rec.status is StepStatus.PENDING or (
            rec.status is StepStatus.DISPATCHED and strategy is not FailureStrategy.WAIT_ALL
        ):
            # A DISPATCHED message may still arrive: its claim fails, so it never runs.
            w.update_step(name, status=StepStatus.CANCELLED, finished_at=w.now, due_at=None)
            w.event("step_cancelled", name, rec.attempt or None)


def needs_compensation(w: Work, name: str) -> bool:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    if spec.kind == StepKind.TRANSFORM or not spec.compensable:
        return False
    # FAILED or CANCELLED with compensation data: a permanent failure that reported
    # partial work, or a step whose worker died in an attempt (outcome unknown).
    return rec.status is StepStatus.SUCCEEDED or (
        rec.status in (StepStatus.FAILED, StepStatus.CANCELLED) and rec.has_compensation_data
    )


def rolled_back(w: Work, name: str, memo: dict[str, bool]) -> bool:
    """True when nothing of `name`, nor of any step after it, is applied any more."""
    if name in memo:
        return memo[name]
    rec = w.steps[name]
    if rec.status in STEP_IN_FLIGHT:
        result = False
    elif needs_compensation(w, name):
        result = rec.comp_status is CompensationStatus.COMPENSATED
    elif rec.status is StepStatus.SUCCEEDED:
        # Nothing to undo here, but what follows it must be undone first.
        result = all(rolled_back(w, d, memo) for d in w.graph.dependents[name])
    else:
        result = True
    memo[name] = result
    return result


def compensation_progress(w: Work) -> None:
    forward_in_flight = [n for n in w.graph.order if w.steps[n].status in STEP_IN_FLIGHT]
    if w.defn.failure_strategy is FailureStrategy.WAIT_ALL and forward_in_flight:
        return
    memo: dict[str, bool] = {}
    for name in reversed(w.graph.order):
        rec = w.steps[name]
        if not needs_compensation(w, name) or rec.comp_status is not None:
            continue
        if all(rolled_back(w, d, memo) for d in w.graph.dependents[name]):
            dispatch_compensation(w, name, attempt=1)
    if forward_in_flight or any(
        w.steps[n].comp_status in COMPENSATION_IN_FLIGHT for n in w.graph.order
    ):
        return
    pending = [n for n in w.graph.order if needs_compensation(w, n)
               and w.steps[n].comp_status is not CompensationStatus.COMPENSATED]
    if not pending:
        w.update_saga(status=SagaStatus.COMPENSATED, finished_at=w.now, due_at=None)
        w.event("saga_compensated", cause=w.saga.error)
        return
    failed = [n for n in pending
              if w.steps[n].comp_status is CompensationStatus.COMPENSATION_FAILED]
    w.update_saga(status=SagaStatus.FAILED, finished_at=w.now, due_at=None)
    w.event("saga_failed", reason="compensation_failed", compensation_failed=failed,
            still_applied=pending, cause=w.saga.error)


def dispatch_compensation(w: Work, name: str, *, attempt: int, countdown: float = 0.0,
                          announce: bool = True) -> None:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    ctx = w.context_for(name)
    data = rec.compensation_data if rec.has_compensation_data else rec.output
    kwargs = {**ctx, "compensation_data": data}
    w.update_step(name, comp_status=CompensationStatus.DISPATCHED, comp_attempt=attempt,
                  lease_until=None, due_at=w.now + countdown + w.timing.redispatch_after,
                  redispatches=0)
    if announce and attempt == 1:
        w.event("compensation_dispatched", name, attempt, Phase.COMPENSATE)
    w.dispatches.append(Dispatch(w.saga.saga_id, w.saga.name, w.saga.fingerprint, name,
                                 Phase.COMPENSATE, attempt, spec.compensation_name or "",
                                 kwargs, countdown=countdown, queue=spec.queue,
                                 timeout=spec.timeout,
                                 child_saga=spec.child.name if spec.child else None,
                                 trace_context=w.saga.trace_context))


def compensation_succeeded(defn: Saga, state: SagaState, step: str, attempt: int, *,
                           now: float, timing: Timing) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.COMPENSATE, attempt):
        return None
    w.update_step(step, comp_status=CompensationStatus.COMPENSATED, lease_until=None,
                  due_at=None, comp_error=None)
    w.event("compensation_succeeded", step, attempt, Phase.COMPENSATE)
    advance(w)
    return w.decision()


def compensation_failed(defn: Saga, state: SagaState, step: str, attempt: int, *, error: str,
                        reason: str = "error", now: float, timing: Timing) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.COMPENSATE, attempt):
        return None
    fail_compensation_attempt(w, step, error=error, reason=reason)
    advance(w)
    return w.decision()


def fail_compensation_attempt(w: Work, name: str, *, error: str, reason: str) -> None:
    rec = w.steps[name]
    policy = w.graph.steps[name].compensation_retry
    if rec.comp_attempt < policy.max_attempts:
        delay = policy.delay(rec.comp_attempt)
        w.event("compensation_attempt_failed", name, rec.comp_attempt, Phase.COMPENSATE,
                reason=reason, error=error, retry_in=round(delay, 3))
        dispatch_compensation(w, name, attempt=rec.comp_attempt + 1, countdown=delay)
        return
    w.update_step(name, comp_status=CompensationStatus.COMPENSATION_FAILED, comp_error=error,
                  lease_until=None, due_at=None)
    w.event("compensation_failed", name, rec.comp_attempt, Phase.COMPENSATE, reason=reason,
            error=error)
