"""Failure text that every store can keep: no NUL, no lone surrogate, a bounded size.

Error messages, tracebacks and event details come from user code and from the
messages of third-party exceptions; they may hold anything Python's `str` can.
PostgreSQL refuses NUL in text, SQLite and MySQL drivers refuse lone surrogates
(they cannot be encoded as UTF-8), and a huge traceback would bloat every read
of the saga. A failure that cannot be written would leave its step RUNNING until
its lease expires, with the real cause lost; so every store passes the failure
text of what it writes through `storable_records` first, and the text reads back
the same from every store.

Only failure text is rewritten: saga input, outputs and compensation data are
the user's values and are validated (refused, never altered) before they are stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..records import Event, SagaRecord, StepRecord

# Characters of one stored text (an error, a traceback, one string of an event's
# detail). 16,000 characters of at most 4 UTF-8 bytes each fit MySQL/MariaDB's
# TEXT column (65,535 bytes); the cut keeps the head (the `Type: message` line and
# the outer frames) and the tail (the frame that raised).
MAX_TEXT = 16_000
_TAIL = 4_000
CUT_MARKER = "\n[... {n} characters cut by sagaline ...]\n"
# Event details are small dicts built by sagaline; deeper values are not expected.
_MAX_DEPTH = 16


def storable_text(text: str) -> str:
    """`text` with NUL and lone surrogates escaped visibly, cut to MAX_TEXT characters."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800": shown as its escape
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= MAX_TEXT:
        return text
    # The marker's own length depends on the count it shows; 10 digits cover any str.
    room = MAX_TEXT - _TAIL - len(CUT_MARKER.format(n=10**9))
    cut = len(text) - room - _TAIL
    return text[:room] + CUT_MARKER.format(n=cut) + text[-_TAIL:]


def storable_value(value: Any, _depth: int = 0) -> Any:
    """A JSON value (an event's detail) with every string, keys included, made storable."""
    if isinstance(value, str):
        return storable_text(value)
    if _depth >= _MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        return storable_text(repr(value))
    if isinstance(value, dict):
        return {storable_text(str(k)): storable_value(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable_value(v, _depth + 1) for v in value]
    return value


def storable_records(
    saga: SagaRecord | None, steps: Iterable[StepRecord], events: Iterable[Event]
) -> None:
    """Make the failure text of records about to be written storable, in place."""
    if saga is not None and saga.error is not None:
        saga.error = storable_text(saga.error)
    for step in steps:
        if step.error is not None:
            step.error = storable_text(step.error)
        if step.comp_error is not None:
            step.comp_error = storable_text(step.comp_error)
    for event in events:
        if event.detail:
            event.detail = storable_value(event.detail)
