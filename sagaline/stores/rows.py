"""Records to and from flat mappings (SQL rows, Redis hashes), derived from their fields.

One mapping for every store: a field added to a record is written and read back
by every store without a line here, and a store that lacks its column fails the
schema and round-trip tests instead of dropping the value silently.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields
from enum import Enum
from typing import Any, TypeVar

from ..records import Event, SagaRecord, StepRecord

R = TypeVar("R", SagaRecord, StepRecord, Event)


def to_row(rec: SagaRecord | StepRecord | Event) -> dict[str, Any]:
    """Every field of `rec` by name; an enum as its value, so that any store can keep it."""
    names = _NAMES.get(type(rec))
    if names is None:
        names = tuple(f.name for f in fields(rec))
    row: dict[str, Any] = {}
    for name in names:  # written out: a step writes several rows, and this is hot
        value = getattr(rec, name)
        row[name] = value.value if isinstance(value, Enum) else value
    return row


def from_row(cls: type[R], row: Mapping[str, Any]) -> R:
    """The record of `cls` from a mapping of its fields.

    Keys that are no field of `cls` are ignored (a Redis hash's `txn`, a field
    written by a newer sagaline); a missing field takes its default. Enum and
    bool fields are coerced (drivers return a str, or 0/1 for a boolean).
    """
    values: dict[str, Any] = {}
    for name, coerce in _READERS[cls]:
        if name in row:
            value = row[name]
            values[name] = value if value is None or coerce is None else coerce(value)
    return cls(**values)


def _readers(cls: type[Any]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """(field, how to coerce a stored value or None) for each field of `cls`."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _coercion(hints[f.name])) for f in fields(cls))


def _coercion(hint: Any) -> Callable[[Any], Any] | None:
    # `X | None` is read as X; None itself is never coerced.
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        enums = [a for a in args if isinstance(a, type) and issubclass(a, Enum)]
        if len(args) == 2 and str in args and len(enums) == 1:
            return _lenient(enums[0])  # `SomeEnum | str`: a value it does not know stays str
        hint = args[0] if len(args) == 1 else None
    if typing.get_origin(hint) is None and isinstance(hint, type) and issubclass(hint, Enum):
        return hint
    if hint is bool:
        return bool
    return None


def _lenient(enum: type[Enum]) -> Callable[[Any], Any]:
    known = {member.value: member for member in enum}

    def coerce(value: Any) -> Any:
        return known.get(value, value)

    return coerce


_READERS = {cls: _readers(cls) for cls in (SagaRecord, StepRecord, Event)}
_NAMES: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in (SagaRecord, StepRecord, Event)
}
