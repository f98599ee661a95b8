"""`sagaline.current_step()`: what a step or compensation body knows about itself."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from .states import Phase


@dataclass(frozen=True)
class StepInfo:
    saga_id: str
    saga_name: str
    step: str
    attempt: int
    phase: Phase

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts and redeliveries: `<saga_id>:<step>` (compensations add
        `:compensate`), to pass to outside services so a repeated call is recognised."""
        base = f"{self.saga_id}:{self.step}"
        return base if self.phase is Phase.FORWARD else f"{base}:compensate"


_current: ContextVar[StepInfo | None] = ContextVar("sagaline_current_step", default=None)


def current_step() -> StepInfo:
    """The step being executed in this task; raises RuntimeError outside a saga step."""
    info = _current.get()
    if info is None:
        raise RuntimeError("sagaline.current_step() called outside a saga step or compensation")
    return info
