"""Trace contexts kept with a saga, attempt span ids, settings, and the JSON log format."""

from __future__ import annotations

import json
import logging

import pytest

from sagaline.config import Settings
from sagaline.context import StepInfo, _current
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
