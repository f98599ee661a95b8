"""Assertions on a saga's outcome and history, and a text timeline for golden tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..records import Event
from ..states import EventKind, SagaStatus

if TYPE_CHECKING:
    from ..handle import SagaHandle

# Detail fields whose values differ from run to run (ids, fingerprints, wall clocks).
_VOLATILE = {
    "fingerprint",
    "idempotency_key",
    "pid",
    "worker",
    "deadline",
    "grace_until",
    "child_saga_id",
}


@dataclass
class History:
    """A saga's history events, oldest first."""

    saga_id: str
    events: list[Event]
    started_at: float

    def kinds(self) -> list[str]:
        """The kind of each event, as text (`"step_succeeded"`, ...)."""
        return [str(e.kind) for e in self.events]

    def of(self, kind: EventKind | str) -> list[Event]:
        return [e for e in self.events if str(e.kind) == str(kind)]

    def steps(self, kind: EventKind | str) -> list[str]:
        """The step of each event of `kind`, in order."""
        return [str(e.step) for e in self.of(kind)]

    def snapshot(self) -> str:
        """The timeline as stable text: time since start, kind, step, attempt, detail.

        In a saga environment the clock is virtual, so the same saga gives the same
        text on every run: compare it with a file for golden tests.
        """
        lines = []
        for e in self.events:
            parts = [f"+{_seconds(e.ts - self.started_at):>9}", str(e.kind)]
            if e.step is not None:
                parts.append(e.step)
            if e.attempt is not None:
                parts.append(f"#{e.attempt}")
            detail = {
                k: v
                for k, v in sorted((e.detail or {}).items())
                if k not in _VOLATILE and v is not None and v is not False
            }
            if detail:
                parts.append(" ".join(f"{k}={_short(v, self.saga_id)}" for k, v in detail.items()))
            lines.append(" ".join(parts))
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.snapshot()


def history(handle: SagaHandle) -> History:
    """The history of the saga behind `handle`, read from its store."""
    saga = handle.record()
    return History(handle.saga_id, handle.runtime.store.history(handle.saga_id), saga.created_at)


def assert_completed(handle: SagaHandle) -> Any:
    """Assert that the saga completed; returns its result."""
    saga = handle.record()
    if saga.status is not SagaStatus.COMPLETED:
        raise AssertionError(
            f"saga {saga.name} {saga.saga_id} is {saga.status.value}, not "
            f"COMPLETED ({saga.error or 'no error'})\n{history(handle)}"
        )
    return saga.output


def assert_compensated(handle: SagaHandle, order: Sequence[Any] | None = None) -> None:
    """Assert that the saga was rolled back: COMPENSATED, and with `order`, that exactly
    those steps were compensated, in that order (step names, or their tasks)."""
    saga = handle.record()
    h = history(handle)
    if saga.status is not SagaStatus.COMPENSATED:
        raise AssertionError(
            f"saga {saga.name} {saga.saga_id} is {saga.status.value}, not "
            f"COMPENSATED ({saga.error or 'no error'})\n{h}"
        )
    if order is None:
        return
    wanted = [_step_name(handle, s) for s in order]
    done = h.steps(EventKind.COMPENSATION_SUCCEEDED)
    if done != wanted:
        raise AssertionError(
            f"saga {saga.name} {saga.saga_id}: compensated {done}, expected {wanted}\n{h}"
        )


def _step_name(handle: SagaHandle, step: Any) -> str:
    if isinstance(step, str):
        return step
    task = getattr(step, "name", None)
    defn = handle.runtime.definition(handle.name)
    for spec in defn.steps:
        if spec.task_name == task:
            return spec.name
    raise AssertionError(f"no step of saga {handle.name} runs task {task!r}")


def _seconds(value: float) -> str:
    return f"{value:.3f}s".replace(".000s", "s")


def _short(value: Any, saga_id: str) -> str:
    text = str(value.value if hasattr(value, "value") else value).replace(saga_id, "<saga>")
    text = text.splitlines()[0] if text else text
    return text if len(text) <= 60 else text[:57] + "..."
