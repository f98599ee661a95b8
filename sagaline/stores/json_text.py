"""One JSON value as text, written and read as `json.dumps` and `json.loads` would, with
the values a stored record holds most (None, str, int, a finite float, the constants)
handled without the encoder or the decoder. The Redis store keeps every record field
as JSON of its own, and a step writes two or three records of 20-30 fields each: the
encoder's setup per call was most of the cost."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

_INF = float("inf")


def json_value(value: Any) -> str:
    """`json.dumps(value)`, exactly."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)  # what json.dumps does with a str
    if kind is int:
        return int.__repr__(value)
    if kind is float and -_INF < value < _INF:
        return float.__repr__(value)
    return json.dumps(value)  # bool, nan and infinities, containers: the encoder's way


_CONSTANTS: dict[str, Any] = {"null": None, "true": True, "false": False}


def json_loads(text: str) -> Any:
    """`json.loads(text)`; a string whose text has no escape is its text unquoted."""
    if text in _CONSTANTS:
        return _CONSTANTS[text]
    if len(text) > 1 and text[0] == text[-1] == '"' and "\\" not in text:
        return text[1:-1]
    return json.loads(text)
