"""Trace contexts kept with a saga, attempt span ids, settings, and the JSON log format."""

from __future__ import annotations

import json
import logging

import pytest

from sagaline.config import Settings
from sagaline.context import StepInfo, StepLogFilter, _current, about_saga, saga_log_extra
from sagaline.exceptions import ConfigurationError
from sagaline.observability.logs import FIELDS, JsonFormatter
from sagaline.observability.tracing import SagaTrace, attempt_span_id
from sagaline.states import Phase

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
ROOT = 0xB7AD6B7169203331
PARENT = 0x00F067AA0BA902B7


def test_a_saga_trace_context_is_the_root_traceparent_then_its_parent() -> None:
    with_parent = SagaTrace(TRACE, ROOT, 1, PARENT)
    text = with_parent.encode()
    assert text == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01:00f067aa0ba902b7"
    assert len(text) <= 128  # the column's width
    assert SagaTrace.decode(text) == with_parent
    alone = SagaTrace(TRACE, ROOT, 0)
    assert alone.encode() == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert SagaTrace.decode(alone.encode()) == alone


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "garbage",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-abc-def-01",
        "00-" + "z" * 32 + "-b7ad6b7169203331-01",
    ],
)
def test_a_stored_context_that_is_no_traceparent_is_ignored(text: str | None) -> None:
    assert SagaTrace.decode(text) is None


def test_attempt_span_ids_are_the_same_everywhere_and_differ_per_attempt() -> None:
    st = SagaTrace(TRACE, ROOT, 1)
    first = attempt_span_id(st, "s-1", "charge", Phase.FORWARD, 1)
    assert first == attempt_span_id(st, "s-1", "charge", "forward", 1)
    others = {
        attempt_span_id(st, "s-1", "charge", Phase.FORWARD, 2),
        attempt_span_id(st, "s-1", "charge", Phase.COMPENSATE, 1),
        attempt_span_id(st, "s-1", "refund", Phase.FORWARD, 1),
        attempt_span_id(st, "s-2", "charge", Phase.FORWARD, 1),
    }
    assert first not in others and len(others) == 4
    assert 0 < first < 2**64


def test_tracing_and_log_format_settings_are_checked() -> None:
    assert Settings.from_env(store_url="memory://", tracing=True).tracing == "otlp"
    assert Settings.from_env(store_url="memory://", tracing=False).tracing == "off"
    assert Settings.from_env(store_url="memory://").log_format == "plain"
    with pytest.raises(ConfigurationError, match="SAGALINE_TRACING"):
        Settings.from_env(store_url="memory://", tracing="jaeger")
    with pytest.raises(ConfigurationError, match="SAGALINE_LOG_FORMAT"):
        Settings.from_env(store_url="memory://", log_format="xml")


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("shop", logging.WARNING, __file__, 1, msg, args, None)


def test_a_json_line_outside_a_step_has_every_field_with_no_saga() -> None:
    doc = json.loads(JsonFormatter().format(_record("hello %s", "world")))
    assert set(FIELDS) <= set(doc)
    assert (doc["message"], doc["level"], doc["logger"]) == ("hello world", "WARNING", "shop")
    assert doc["saga_id"] is None and doc["step"] is None
    assert doc["time"].endswith("Z") and "T" in doc["time"]


def test_a_json_line_inside_a_step_carries_it_and_stays_one_line() -> None:
    token = _current.set(StepInfo("s-1", "order", "charge", 2, Phase.COMPENSATE))
    try:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            record = _record("multi\nline %r", object())
            import sys

            record.exc_info = sys.exc_info()
        line = JsonFormatter().format(record)
    finally:
        _current.reset(token)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["saga_id"], doc["saga"], doc["step"], doc["attempt"], doc["phase"]) == (
        "s-1",
        "order",
        "charge",
        2,
        "compensate",
    )
    assert "ValueError: bad" in doc["exception"]


def _saga_fields(record: logging.LogRecord) -> tuple[object, ...]:
    doc = json.loads(JsonFormatter().format(record))
    return tuple(doc[k] for k in ("saga_id", "saga", "step", "attempt", "phase"))


def test_sagalines_records_about_a_saga_outside_a_step_carry_what_is_known_of_it() -> None:
    with about_saga("s-2", step="ship", phase=Phase.FORWARD, attempt=3) as about:
        assert _saga_fields(_record("refused")) == ("s-2", None, "ship", 3, "forward")
        about.saga_name = "order"  # completed once the saga's state is read
        # A context of the same saga, with nothing new, is the one around it.
        with about_saga("s-2") as inner:
            assert inner is about
            assert _saga_fields(_record("retrying")) == ("s-2", "order", "ship", 3, "forward")
        # Another saga's context hides this one's fields.
        with about_saga("s-3", "refund"):
            assert _saga_fields(_record("x")) == ("s-3", "refund", None, None, None)
    assert _saga_fields(_record("after")) == (None,) * 5
    # One call names its saga with `extra=`; the plain format's filter reads it too.
    record = _record("publish failed")
    record.__dict__.update(saga_log_extra("s-4", None, "charge", Phase.COMPENSATE, 1))
    assert _saga_fields(record) == ("s-4", None, "charge", 1, "compensate")
    StepLogFilter().filter(record)
    assert (record.saga_id, record.saga_step) == ("s-4", "charge")


def test_inside_a_step_a_context_of_the_same_saga_keeps_the_steps_fields() -> None:
    token = _current.set(StepInfo("s-1", "order", "charge", 2, Phase.FORWARD))
    try:
        with about_saga("s-1"):
            assert _saga_fields(_record("x")) == ("s-1", "order", "charge", 2, "forward")
        with about_saga("s-9", "child"):  # work on another saga (a child) names it
            assert _saga_fields(_record("y")) == ("s-9", "child", None, None, None)
    finally:
        _current.reset(token)
    record = _record("z")
    StepLogFilter().filter(record)
    assert (record.saga_id, record.saga_step) == ("-", "-")
