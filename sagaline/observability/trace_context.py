"""A saga's stored trace context, and the ids, names and attributes of its spans.

Imported through `tracing`, which names the `otel` extra when OpenTelemetry is missing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import IdGenerator

from ..states import Phase

log = logging.getLogger("sagaline")


# Attribute names (the proposed `workflow.*` conventions are not stable yet).
SAGA_ID = "saga.id"
SAGA_NAME = "saga.name"
SAGA_STEP = "saga.step"
SAGA_ATTEMPT = "saga.attempt"
SAGA_PHASE = "saga.phase"
SAGA_STATUS = "saga.status"
SAGA_OUTCOME = "saga.outcome"


@dataclass(frozen=True)
class SagaTrace:
    """The stored trace context of one saga: its root span and that span's parent."""

    trace_id: int
    span_id: int
    flags: int
    parent_span_id: int | None = None

    def encode(self) -> str:
        text = f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"
        return text if self.parent_span_id is None else f"{text}:{self.parent_span_id:016x}"

    @classmethod
    def decode(cls, text: str | None) -> SagaTrace | None:
        """The context stored with a saga; None (logged) if there is none or it is not one."""
        return _decode(text) if text else None

    @classmethod
    def _parse(cls, text: str) -> SagaTrace | None:
        try:
            head, _, parent = text.partition(":")
            version, trace_id, span_id, flags = head.split("-")
            if version != "00" or len(trace_id) != 32 or len(span_id) != 16:
                raise ValueError(text)
            return cls(
                int(trace_id, 16),
                int(span_id, 16),
                int(flags, 16),
                int(parent, 16) if parent else None,
            )
        except ValueError:
            log.warning("ignoring a saga trace context that is no traceparent: %r", text)
            return None

    @functools.cached_property
    def _root_context(self) -> Any:
        return trace.set_span_in_context(trace.NonRecordingSpan(self._span_context(self.span_id)))

    def root_context(self) -> Any:
        """An OpenTelemetry context whose current span is the saga's root span (contexts
        are immutable: one object serves every attempt and publish of the saga)."""
        return self._root_context

    def parent_context(self) -> Any:
        """The context the root span is created in: its parent's, or none."""
        if self.parent_span_id is None:
            return otel_context.Context()
        return trace.set_span_in_context(
            trace.NonRecordingSpan(self._span_context(self.parent_span_id))
        )

    def _span_context(self, span_id: int) -> trace.SpanContext:
        return trace.SpanContext(
            self.trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(self.flags)
        )


# A process decodes the same few contexts again and again (each attempt, each publish
# and the end of the sagas it runs): the last ones decoded are kept.
@functools.lru_cache(maxsize=1024)
def _decode(text: str) -> SagaTrace | None:
    return SagaTrace._parse(text)


def attempt_span_id(
    saga_trace: SagaTrace, saga_id: str, step: str, phase: Phase | str, attempt: int
) -> int:
    """The span id of one attempt: the same in every process, so never made twice."""
    phase_name = phase.value if isinstance(phase, Phase) else phase
    digest = hashlib.blake2b(
        f"{saga_trace.span_id:016x}:{saga_id}:{step}:{phase_name}:{attempt}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") or 1


class PresetIds(IdGenerator):
    """The tracer's id generator, unless sagaline set the ids of the next span."""

    def __init__(self, inner: IdGenerator):
        self.inner = inner
        self.preset: ContextVar[tuple[int, int] | None] = ContextVar(
            "sagaline_preset_span_ids", default=None
        )

    def generate_span_id(self) -> int:
        preset = self.preset.get()
        return preset[1] if preset else self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = self.preset.get()
        return preset[0] if preset else self.inner.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        # Asked by SDKs since 1.39; absent from the generators of older ones.
        random_ids = getattr(self.inner, "is_trace_id_random", None)
        return bool(random_ids()) if random_ids is not None else False


def saga_span_name(name: str) -> str:
    return f"saga {name}"


def attempt_span_name(step: str, phase: Phase) -> str:
    return f"step {step}" if phase is Phase.FORWARD else f"compensate {step}"


def attempt_attributes(
    saga_id: str, name: str, step: str, phase: Phase, attempt: int
) -> dict[str, Any]:
    return {
        SAGA_ID: saga_id,
        SAGA_NAME: name,
        SAGA_STEP: step,
        SAGA_ATTEMPT: attempt,
        SAGA_PHASE: phase.value,
    }
