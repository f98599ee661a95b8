"""Faults a test injects into a saga environment: crashes, duplicates, lost messages,
expired leases, failing compensations. Each fires a given number of times."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..states import Phase

CRASH_POINTS = ("before_claim", "after_body")


class SimulatedCrash(BaseException):
    """The worker process died here (raised through Celery's tracer, as a real death
    would leave nothing recorded)."""


class InjectedFailure(Exception):
    """A failure injected by `faults.fail_compensation` (an ordinary task error)."""


def step_key(step: Any) -> str:
    """A step named by its step name, its task name, or the task object itself."""
    if isinstance(step, str) and step:
        return step
    name = getattr(step, "name", None)
    if isinstance(name, str) and name:
        return name
    raise TypeError(f"name a step by its step name, task name or task, not {step!r}")


@dataclass
class Fault:
    """One injected fault, for `times` matching messages."""

    kind: str
    step: str
    phase: Phase
    times: int
    fired: int = 0

    def matches(self, step: str, task_name: str, phase: Phase) -> bool:
        return self.fired < self.times and self.phase is phase and self.step in (step, task_name)

    def describe(self) -> str:
        where = self.step if self.phase is Phase.FORWARD else f"{self.step} (compensation)"
        return f"{self.kind.replace('_', ' ')} at {where}"


@dataclass
class Faults:
    """The faults armed in one environment (the `faults` fixture).

    A step is named by its step name, its task name, or its task. `phase` is
    "forward" (the step) or "compensate" (its compensation).
    """

    armed: list[Fault] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def _arm(self, kind: str, step: Any, phase: str | Phase, times: int) -> Fault:
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError(f"times must be a positive integer, got {times!r}")
        try:
            ph = Phase(phase)
        except ValueError:
            raise ValueError(f"phase must be 'forward' or 'compensate', got {phase!r}") from None
        fault = Fault(kind, step_key(step), ph, times)
        self.armed.append(fault)
        return fault

    def crash(
        self, step: Any, *, at: str = "after_body", phase: str = "forward", times: int = 1
    ) -> Fault:
        """The worker dies `before_claim` (the message is consumed, nothing recorded) or
        `after_body` (the body applied its effect; its completion is never written)."""
        if at not in CRASH_POINTS:
            raise ValueError(f"at= must be one of {', '.join(CRASH_POINTS)}, got {at!r}")
        return self._arm(f"crash_{at}", step, phase, times)

    def duplicate(self, step: Any, *, phase: str = "forward", times: int = 1) -> Fault:
        """The broker delivers the step's message twice."""
        return self._arm("duplicate", step, phase, times)

    def lose_message(self, step: Any, *, phase: str = "forward", times: int = 1) -> Fault:
        """The step's message is lost between the store's commit and the broker."""
        return self._arm("lose_message", step, phase, times)

    def expire_lease(self, step: Any, *, phase: str = "forward", times: int = 1) -> Fault:
        """The worker running the step freezes past its lease: the sweeper takes the
        attempt as crashed and retries it; the late completion is fenced out."""
        return self._arm("expire_lease", step, phase, times)

    def fail_after_body(self, step: Any, *, times: int = 1) -> Fault:
        """The step applies its change, then fails for good, reporting what it did
        (its result becomes its compensation data): its own change is undone too."""
        return self._arm("fail_after_body", step, Phase.FORWARD, times)

    def fail_compensation(self, step: Any, *, times: int = 1) -> Fault:
        """The step's compensation raises `times` times (then runs normally)."""
        return self._arm("fail_compensation", step, Phase.COMPENSATE, times)

    def take(self, kind: str, step: str, task_name: str, phase: Phase) -> Fault | None:
        """Fire one armed fault of `kind` matching this message, if any."""
        for fault in self.armed:
            if fault.kind == kind and fault.matches(step, task_name, phase):
                fault.fired += 1
                self.log.append(fault.describe())
                return fault
        return None

    def unfired(self) -> list[Fault]:
        """Faults armed but never (or not fully) fired."""
        return [f for f in self.armed if f.fired < f.times]
