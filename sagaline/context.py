"""`sagaline.current_step()`: what a step or compensation body knows about itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

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


# -- what a log record is about --------------------------------------------------------------


@dataclass
class SagaLogFields:
    """The saga a log record is about, as far as it is known where it is logged."""

    saga_id: str
    saga_name: str | None = None
    step: str | None = None
    attempt: int | None = None
    phase: str | None = None


# Set around sagaline's work on one saga outside a step body (a claim, the sweeper's
# repair of one item, a hand-back, a transaction): its log records carry the saga.
_about: ContextVar[SagaLogFields | None] = ContextVar("sagaline_log_saga", default=None)
_EXTRA = "sagaline_saga"  # the LogRecord attribute of `saga_log_extra`


@contextlib.contextmanager
def about_saga(
    saga_id: str,
    name: str | None = None,
    step: str | None = None,
    phase: Phase | str | None = None,
    attempt: int | None = None,
) -> Iterator[SagaLogFields]:
    """Records logged inside are about this saga. The fields yielded may be completed
    later (the saga's name, once its state is read). Inside the same saga's context
    without new fields, it is that context."""
    outer = _about.get()
    fields = SagaLogFields(saga_id, name, step, attempt, _phase_name(phase))
    if outer is not None and outer.saga_id == saga_id:
        if fields == SagaLogFields(saga_id):
            yield outer
            return
        fields = _merged(fields, outer)
    token = _about.set(fields)
    try:
        yield fields
    finally:
        _about.reset(token)


def saga_log_extra(
    saga_id: str,
    name: str | None = None,
    step: str | None = None,
    phase: Phase | str | None = None,
    attempt: int | None = None,
) -> Mapping[str, Any]:
    """`extra=` for one log call about a saga, where no `about_saga` context is set."""
    return {_EXTRA: SagaLogFields(saga_id, name, step, attempt, _phase_name(phase))}


def log_fields(record: logging.LogRecord | None = None) -> SagaLogFields | None:
    """The saga a record is about: its `saga_log_extra`, else the `about_saga` context,
    else the step being run; the fields one lacks are taken from the next of the same saga."""
    found: SagaLogFields | None = None
    for fields in (getattr(record, _EXTRA, None), _about.get(), _step_fields()):
        if not isinstance(fields, SagaLogFields):
            continue
        if found is None:
            found = fields
        elif fields.saga_id == found.saga_id:
            found = _merged(found, fields)
    return found


def _step_fields() -> SagaLogFields | None:
    info = _current.get()
    if info is None:
        return None
    return SagaLogFields(info.saga_id, info.saga_name, info.step, info.attempt, info.phase.value)


def _merged(first: SagaLogFields, then: SagaLogFields) -> SagaLogFields:
    return SagaLogFields(
        first.saga_id,
        first.saga_name if first.saga_name is not None else then.saga_name,
        first.step if first.step is not None else then.step,
        first.attempt if first.attempt is not None else then.attempt,
        first.phase if first.phase is not None else then.phase,
    )


def _phase_name(phase: Phase | str | None) -> str | None:
    return phase.value if isinstance(phase, Phase) else phase


class StepLogFilter(logging.Filter):
    """Adds `saga_id` and `saga_step` to every log record ("-" when it is about no saga).

    `init_app` installs it on Celery's task logger, so a worker's
    `worker_task_log_format` can use `%(saga_id)s` and `%(saga_step)s`; add it to
    any other handler the same way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = log_fields(record)
        record.saga_id = fields.saga_id if fields else "-"
        record.saga_step = (fields.step if fields else None) or "-"
        return True
