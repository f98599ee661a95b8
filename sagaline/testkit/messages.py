"""What the in-memory broker of a saga environment holds: messages, the retries that
wait in virtual time, and the record of what each delivery and body run did."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Any

from ..records import Dispatch
from ..runtime import DelayedPublisher
from ..states import Phase
from .clock import VirtualClock


@dataclass
class Message:
    """One step message in the in-memory broker (kwargs after the JSON round trip)."""

    id: str
    task_name: str
    kwargs: dict[str, Any]
    meta: dict[str, Any]

    @property
    def step(self) -> str:
        return str(self.meta["step"])

    @property
    def phase(self) -> Phase:
        return Phase(self.meta["phase"])

    def __repr__(self) -> str:
        return (
            f"<Message {self.meta['saga_id'][:8]} {self.step} {self.phase.value} "
            f"#{self.meta['attempt']}>"
        )


@dataclass
class BodyRun:
    """One run of a step's (or compensation's) body, after its claim succeeded."""

    saga_id: str
    step: str
    phase: Phase
    attempt: int
    idempotency_key: str
    outcome: str = "running"  # returned | raised | crashed | failed_after_body

    @property
    def applied(self) -> bool:
        """The body got to its end: its effect, if any, is applied."""
        return self.outcome in ("returned", "crashed", "failed_after_body")


@dataclass
class Delivery:
    """What happened to one delivered message."""

    message: Message
    outcome: str  # SUCCESS, FAILURE, IGNORED (claim refused), crashed, refused


class VirtualTimers(DelayedPublisher):
    """Retries waiting out their backoff, in virtual time (no thread)."""

    def __init__(self, clock: VirtualClock):
        super().__init__(lambda d: None)
        self.clock = clock
        self._heap: list[tuple[float, int, Dispatch]] = []
        self._n = 0

    def add(self, d: Dispatch) -> None:
        self._n += 1
        heapq.heappush(self._heap, (self.clock() + d.countdown, self._n, d))

    def pending(self) -> int:
        return len(self._heap)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Dispatch]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(replace(heapq.heappop(self._heap)[2], countdown=0.0))
        return due


class NoHeartbeat:
    """Bodies run synchronously here: a lease runs out only when virtual time passes."""

    def add(self, saga_id: str, step: str, phase: Phase, attempt: int) -> int:
        return 0

    def remove(self, token: int) -> None:
        return None
