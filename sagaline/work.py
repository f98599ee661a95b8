"""The engine's working copy of one saga: what changed, and the context a step sees.

`Work` copies a saga's state, checks every move against the transition tables of
states.py, and collects the records, history events and messages of one Decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from . import payload
from .definition import Saga
from .records import Decision, Dispatch, Event, SagaRecord, SagaState, StepRecord
from .states import (
    COMPENSATION_TRANSITIONS,
    SAGA_TRANSITIONS,
    STEP_TRANSITIONS,
    EventKind,
    Phase,
    StepStatus,
)

R = TypeVar("R", SagaRecord, StepRecord)


@dataclass(frozen=True, slots=True)
class Timing:
    """Engine knobs, from the settings (config.py)."""

    redispatch_after: float = 30.0
    # A step whose worker died (lease expired) is run again this many extra times
    # before it counts as failed: a crash is not a business failure.
    crash_retries: int = 3
    # The largest JSON document a message may carry (payload.py).
    max_payload_bytes: int = payload.DEFAULT_MAX_BYTES


def _positional_fields(cls: type[Any]) -> tuple[str, ...]:
    fs = fields(cls)
    if not all(f.init and not f.kw_only for f in fs):
        raise TypeError(f"{cls.__name__}: every field must be a positional __init__ argument")
    return tuple(f.name for f in fs)


_FIELDS = {cls: _positional_fields(cls) for cls in (SagaRecord, StepRecord)}


def _copy(rec: R) -> R:
    """A shallow copy, as `dataclasses.replace(rec)` makes, at less than half its cost
    (the engine copies each record a decision changes)."""
    names = _FIELDS.get(type(rec))
    if names is None:
        return replace(rec)
    return type(rec)(*[getattr(rec, name) for name in names])


class Work:
    """A mutable copy of a saga's state that collects what changed.

    A step record is copied only when `update_step` first changes it: a decision
    changes one or two steps of a saga, and copying all of them for each decision
    made a saga's cost grow with the square of its length. Until then `steps` holds
    the records of the state read, which a store may share between reads
    (redis_cache.py) and which nothing here ever changes in place.
    """

    def __init__(self, defn: Saga, state: SagaState, now: float, timing: Timing):
        self.defn = defn
        self.graph = defn.graph
        self.now = now
        self.timing = timing
        self.saga = _copy(state.saga)
        # The records read until update_step replaces one with its changed copy.
        self.steps = dict(state.steps)
        self.orig = state
        self.saga_changed = False
        self.changed: set[str] = set()
        self.events: list[Event] = []
        self.dispatches: list[Dispatch] = []

    # -- recording ---------------------------------------------------------------

    def event(
        self,
        kind: EventKind,
        step: str | None = None,
        attempt: int | None = None,
        phase: Phase | None = None,
        **detail: Any,
    ) -> None:
        self.events.append(
            Event(
                self.saga.saga_id,
                kind,
                self.now,
                step,
                attempt,
                None if phase is None else phase.value,
                detail,
            )
        )

    def update_step(self, name: str, **fields: Any) -> StepRecord:
        """Change step `name`, checked against the transition tables; returns its record
        in this Work. A record taken from `steps` before a step's first change is the
        one read, which keeps its old values: read the step again to see the new ones."""
        rec = self.steps[name]
        check_transition(
            STEP_TRANSITIONS, rec.status, fields.get("status", rec.status), f"step {name!r}"
        )
        check_transition(
            COMPENSATION_TRANSITIONS,
            rec.comp_status,
            fields.get("comp_status", rec.comp_status),
            f"compensation of {name!r}",
        )
        if name not in self.changed:  # still the record read: change a copy of it
            rec = self.steps[name] = _copy(rec)
            self.changed.add(name)
        for k, v in fields.items():
            setattr(rec, k, v)
        return rec

    def update_saga(self, **fields: Any) -> None:
        check_transition(
            SAGA_TRANSITIONS, self.saga.status, fields.get("status", self.saga.status), "saga"
        )
        for k, v in fields.items():
            setattr(self.saga, k, v)
        self.saga.updated_at = self.now
        self.saga_changed = True

    def send(
        self,
        name: str,
        phase: Phase,
        attempt: int,
        task_name: str,
        kwargs: dict[str, Any],
        countdown: float,
    ) -> None:
        """Queue the message of one attempt of step `name` (forward or compensation)."""
        spec = self.graph.steps[name]
        self.dispatches.append(
            Dispatch(
                self.saga.saga_id,
                self.saga.name,
                self.saga.fingerprint,
                name,
                phase,
                attempt,
                task_name,
                kwargs,
                countdown=countdown,
                queue=spec.queue,
                timeout=spec.timeout,
                child_saga=spec.child.name if spec.child else None,
                trace_context=self.saga.trace_context,
            )
        )

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
        return any(
            self.graph.steps[n].pivot and self.steps[n].status is StepStatus.SUCCEEDED
            for n in self.graph.order
        )


def check_transition(table: Mapping[Any, frozenset[Any]], old: Any, new: Any, what: str) -> None:
    """The engine only makes moves the tables of states.py allow (a guard against its bugs)."""
    if new != old and new not in table.get(old, frozenset()):
        raise RuntimeError(f"sagaline engine bug: {what} cannot go from {old} to {new}")


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What `after` adds to or changes in `before` (saga_id aside): an output to merge."""
    return {
        k: v for k, v in after.items() if k != "saga_id" and (k not in before or before[k] != v)
    }


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
