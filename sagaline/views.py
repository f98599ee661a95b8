"""A saga as the surfaces show it: its view, its attempts, why it failed, and its JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import Enum
from typing import Any

from .config import duration_seconds
from .engine import first_line
from .records import Event, SagaRecord, SagaState, StepRecord
from .states import CompensationStatus, EventKind, SagaStatus


@dataclass(slots=True)
class SagaView:
    """A saga as any process can read it: the record, its steps and its history."""

    saga: SagaRecord
    steps: list[StepRecord]
    history: list[Event] = field(default_factory=list)
    children: list[SagaRecord] = field(default_factory=list)

    @property
    def saga_id(self) -> str:
        return self.saga.saga_id

    @property
    def name(self) -> str:
        return self.saga.name

    @property
    def status(self) -> SagaStatus:
        return self.saga.status

    @property
    def output(self) -> Any:
        return self.saga.output

    @property
    def error(self) -> str | None:
        return self.saga.error

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def of(cls, state: SagaState, history: list[Event] | None = None) -> SagaView:
        """The view of a saga's state (`Store.read_state`), with its history if read."""
        return cls(state.saga, list(state.steps.values()), history or [])


# -- reading a saga's history (CLI `show`, the dashboard's timeline, audits) ---------------

# The events that end one attempt of a step (forward) or of its compensation.
_ATTEMPT_ENDS: dict[EventKind | str, str] = {
    EventKind.STEP_SUCCEEDED: "succeeded",
    EventKind.STEP_ATTEMPT_FAILED: "failed",
    EventKind.STEP_FAILED: "failed",
    EventKind.STEP_ABANDONED: "abandoned",
    EventKind.COMPENSATION_SUCCEEDED: "succeeded",
    EventKind.COMPENSATION_ATTEMPT_FAILED: "failed",
    EventKind.COMPENSATION_FAILED: "failed",
}
_ATTEMPT_STARTS = {EventKind.STEP_STARTED, EventKind.COMPENSATION_STARTED}


@dataclass(slots=True)
class Attempt:
    """One run of a step body or of its compensation, as the history recorded it."""

    step: str
    phase: str
    attempt: int
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str = "running"  # running | succeeded | failed | abandoned
    error: str | None = None  # the first line of the error

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def step_attempts(history: list[Event]) -> list[Attempt]:
    """Every attempt of every step and compensation, in the order they started."""
    attempts: dict[tuple[str, str, int], Attempt] = {}
    for ev in history:
        if ev.step is None or ev.attempt is None or ev.phase is None:
            continue
        if ev.kind not in _ATTEMPT_STARTS and ev.kind not in _ATTEMPT_ENDS:
            continue
        key = (ev.step, ev.phase, ev.attempt)
        att = attempts.setdefault(key, Attempt(ev.step, ev.phase, ev.attempt))
        if ev.kind in _ATTEMPT_STARTS:
            att.started_at = ev.ts
        else:
            att.finished_at = ev.ts
            att.outcome = _ATTEMPT_ENDS[ev.kind]
            error = ev.detail.get("error")
            att.error = first_line(error) if error else None
    return sorted(attempts.values(), key=lambda a: a.started_at or a.finished_at or 0.0)


def compensation_failures(steps: list[StepRecord]) -> dict[str, str]:
    """The steps whose compensation failed for good, with the first line of its error."""
    return {
        s.name: first_line(s.comp_error) or "no error recorded"
        for s in steps
        if s.comp_status is CompensationStatus.COMPENSATION_FAILED
    }


def failure_summary(saga: SagaRecord, steps: list[StepRecord]) -> str | None:
    """One line saying why a saga did not complete: its cause and, for a FAILED saga,
    which compensations failed and why (the cause alone hides that steps stay applied)."""
    if saga.status is SagaStatus.COMPLETED or (
        not saga.error and saga.status is not SagaStatus.FAILED
    ):
        return None
    parts = [first_line(saga.error)] if saga.error else []
    if saga.status is SagaStatus.FAILED:
        parts += [
            f"compensation of {name!r} failed: {error}"
            for name, error in compensation_failures(steps).items()
        ]
    return "; ".join(parts) or None


def summary_as_dict(view: SagaView) -> dict[str, Any]:
    """A saga as one line of a list (`ls --json`, `GET /api/v1/sagas`)."""
    return {
        **_plain(view.saga),
        "summary": failure_summary(view.saga, view.steps),
        "compensation_failures": compensation_failures(view.steps),
    }


def view_as_dict(view: SagaView) -> dict[str, Any]:
    """A saga with its steps, attempts and history as plain JSON-ready data.

    Records are converted one level deep only: stored values (input, outputs) are
    JSON already, and copying them recursively fails on deeply nested values.
    """
    return {
        "saga": _plain(view.saga),
        "summary": failure_summary(view.saga, view.steps),
        "compensation_failures": compensation_failures(view.steps),
        "steps": [_plain(s) for s in view.steps],
        "attempts": [{**_plain(a), "duration": a.duration} for a in step_attempts(view.history)],
        "history": [_plain(e) for e in view.history],
        "children": [_plain(c) for c in view.children],
    }


def event_as_dict(event: Event) -> dict[str, Any]:
    return _plain(event)


def _plain(record: Any) -> dict[str, Any]:
    return {f.name: _enum_value(getattr(record, f.name)) for f in fields(record)}


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def cut_deep(value: Any, depth: int) -> Any:
    """A copy of a JSON value with the levels below `depth` replaced by a marker.

    Iterative on purpose: recursion is what fails on such values.
    """
    root: list[Any] = [None]
    todo: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]
    while todo:
        item, parent, key, level = todo.pop()
        if isinstance(item, (dict, list, tuple)) and level >= depth:
            parent[key] = f"<{type(item).__name__} nested deeper than {depth} levels: not shown>"
        elif isinstance(item, dict):
            copy: dict[Any, Any] = dict.fromkeys(item)  # keeps the key order
            todo += [(v, copy, k, level + 1) for k, v in item.items()]
            parent[key] = copy
        elif isinstance(item, (list, tuple)):
            items: list[Any] = [None] * len(item)
            todo += [(v, items, i, level + 1) for i, v in enumerate(item)]
            parent[key] = items
        else:
            parent[key] = item
    return root[0]


def parse_when(value: str, now: float | None = None) -> float:
    """An ISO time (local when naive) or a relative one back from now: 30s, 10m, 2h, 1d,
    1w, 1h30m (config's duration grammar; a bare number is no relative time)."""
    now = time.time() if now is None else now
    ago = duration_seconds(value, unit_needed=True)
    if ago is not None:
        return now - ago
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"{value!r} is neither an ISO time nor a relative one like 10m, 2h, 1d"
        ) from None
