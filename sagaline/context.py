"""`sagaline.current_step()`: what a step or compensation body knows about itself."""

from __future__ import annotations

import logging
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


class StepLogFilter(logging.Filter):
    """Adds `saga_id` and `saga_step` to every log record ("-" outside a saga step).

    `init_app` installs it on Celery's task logger, so a worker's
    `worker_task_log_format` can use `%(saga_id)s` and `%(saga_step)s`; add it to
    any other handler the same way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = _current.get()
        record.saga_id = info.saga_id if info else "-"
        record.saga_step = info.step if info else "-"
        return True
