"""What a message can carry: the one definition of the JSON sagaline accepts, stores and sends.

Every value that enters a saga goes through here before anything is stored or
published: the input of `run()` (and of a child saga), step outputs, compensation
data, transform results and input mappers. The rules exist because of what sits
downstream, and each one is the strictest of those places:

- JSON only, no NaN or Infinity, and object keys are strings: Celery's json
  serializer would turn `{7: "x"}` into `{"7": "x"}` (or lose one of
  `{1: "a", "1": "b"}`), and Python cannot pass a non-string keyword argument.
- No NUL character and no lone surrogate in any string: PostgreSQL refuses both
  in `jsonb`, other stores take them, so they are refused everywhere.
- At most MAX_DEPTH levels of nesting: MariaDB's JSON check refuses documents
  nested deeper than 31 levels, and the saga's result may add one level to what a
  step returned. A prefork worker pickles every message it hands to a pool child
  and dies of RecursionError at about 450 levels (measured on CPython 3.11 with
  the default recursion limit); the limit keeps far away from that.
- At most `max_bytes` of JSON per document (setting `max_payload_bytes`).
- No object with exactly the keys `__type__` and `__value__`: that is kombu's
  envelope for datetimes, bytes, Decimals and UUIDs, decoded by every worker
  into another type (or refused: the message is dropped). It is refused rather
  than escaped: escaping would have to be undone in every consumer of the
  messages and the store, and such data is almost always a serialized Python
  object that should be converted explicitly.
- The reserved context keys (`saga_id`, `compensation_data`) are set by sagaline
  and may not appear at the top level of an input or output.

The walk is iterative, so no depth of nesting can raise RecursionError here, and
it stops as soon as a limit is passed, so cyclic or hugely shared structures
cost at most the size limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .exceptions import InputError

# Containers (objects and arrays) nest at most this deep, counting the context
# object itself (the saga input, a dict output) as the first level.
MAX_DEPTH = 30
# The keys sagaline puts into the keyword arguments of steps and compensations.
RESERVED_KEYS = frozenset({"saga_id", "compensation_data"})
# kombu's json decoder turns an object with exactly these keys into another type.
KOMBU_ENVELOPE = frozenset({"__type__", "__value__"})
# Python refuses to turn longer integers into text (sys.get_int_max_str_digits, 4300).
MAX_INT_BITS = 14_000

# The default of the setting max_payload_bytes (config.py).
DEFAULT_MAX_BYTES = 1024 * 1024
# Names and keys that every store keeps in a column of this many characters
# (stores/schema.py sizes its columns from these).
MAX_NAME_LENGTH = 200  # saga names and step names
MAX_KEY_LENGTH = 255  # idempotency keys

# Rule names, for InputError.rule (an API maps them to a problem type).
TYPE, KEY, NUMBER, TEXT, DEPTH, SIZE, ENVELOPE, RESERVED = (
    "type",
    "key",
    "number",
    "text",
    "depth",
    "size",
    "envelope",
    "reserved",
)


def check_object(
    value: Any, where: str, *, max_bytes: int, reserved: frozenset[str] = RESERVED_KEYS
) -> int:
    """Check a JSON object whose keys become context keys (an input, a dict output).

    Returns the size of its JSON in bytes; raises InputError naming the rule and where.
    """
    if not isinstance(value, Mapping):
        raise _refuse(TYPE, where, f"must be a JSON object (a dict), got {type(value).__name__}")
    for key in value:
        if isinstance(key, str) and key in reserved:
            raise _refuse(
                RESERVED,
                f"{where}[{key!r}]",
                f"{key!r} is a reserved context key that sagaline sets itself",
            )
    _walk(value, where, max_bytes=max_bytes, start_depth=0)
    return _size(value, where, max_bytes)


def check_value(value: Any, where: str, *, max_bytes: int) -> int:
    """Check a value carried under one name (a non-dict output, compensation data)."""
    # It sits one level down: in the context under the step's name, or in a
    # compensation's keyword arguments.
    _walk(value, where, max_bytes=max_bytes, start_depth=1)
    return _size(value, where, max_bytes)


def check_output(value: Any, where: str, *, max_bytes: int) -> int:
    """A step's output: a dict is merged into the context, anything else is stored whole."""
    if isinstance(value, Mapping):
        return check_object(value, where, max_bytes=max_bytes)
    return check_value(value, where, max_bytes=max_bytes)


def check_size(value: Any, where: str, *, max_bytes: int) -> int:
    """Only the size, for values assembled from parts that were checked (a step's context)."""
    return _size(value, where, max_bytes)


def check_text(
    value: Any, what: str, *, limit: int, error: type[Exception] = InputError, **fields: Any
) -> None:
    """A name or key that stores keep in a column of `limit` characters."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    problem = None
    if not value:
        problem = "must not be empty"
    elif len(value) > limit:
        problem = f"is {len(value)} characters long, over the limit of {limit}"
    else:
        problem = text_problem(value)
    if problem is not None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise error(f"{what} {shown!r} {problem}", **fields)


def text_problem(s: str) -> str | None:
    """Why a string cannot be stored by every store, or None."""
    if "\x00" in s:
        return "contains a NUL character (\\x00), which PostgreSQL cannot store"
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (it contains a lone surrogate)"
    return None


def fingerprint(value: Any) -> str:
    """A stable hash of a checked input: equal for inputs that are equal as JSON."""
    import hashlib

    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# -- the walk ------------------------------------------------------------------------


def _walk(root: Any, where: str, *, max_bytes: int, start_depth: int) -> None:
    # Each entry: (value, depth of the value, path as a linked list (parent, key)).
    stack: list[tuple[Any, int, Any]] = [(root, start_depth, None)]
    visited = 0
    while stack:
        value, depth, path = stack.pop()
        visited += 1
        if visited > max_bytes:
            # Every JSON value takes at least one byte: this one is over the limit
            # (shared or cyclic structures end here too, never in an endless walk).
            raise _refuse(
                SIZE,
                where,
                f"is larger than the limit of {max_bytes} bytes of "
                "JSON (setting max_payload_bytes)",
            )
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                raise _refuse(TEXT, _render(where, path), f"the string {problem}")
            continue
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise _refuse(
                    NUMBER,
                    _render(where, path),
                    "an integer this large is not carried (over ~4000 digits)",
                )
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _refuse(
                    NUMBER,
                    _render(where, path),
                    f"{value} is not JSON (NaN and Infinity are refused)",
                )
            continue
        if isinstance(value, (dict, list, tuple)):
            if depth + 1 > MAX_DEPTH:
                raise _refuse(
                    DEPTH, _render(where, path), f"nesting deeper than {MAX_DEPTH} levels"
                )
            if isinstance(value, dict):
                if value.keys() == KOMBU_ENVELOPE:
                    raise _refuse(
                        ENVELOPE,
                        _render(where, path),
                        "an object with exactly the keys '__type__' and '__value__' "
                        "is kombu's envelope for non-JSON types; rename a key",
                    )
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _refuse(
                            KEY,
                            _render(where, path),
                            f"key {key!r} ({type(key).__name__}) is not a "
                            "string; JSON object keys must be strings",
                        )
                    problem = text_problem(key)
                    if problem is not None:
                        raise _refuse(TEXT, _render(where, path), f"the key {key!r} {problem}")
                    stack.append((item, depth + 1, (path, key)))
            else:
                for i, item in enumerate(value):
                    stack.append((item, depth + 1, (path, i)))
            continue
        raise _refuse(
            TYPE,
            _render(where, path),
            f"type {type(value).__name__} is not JSON; convert it (str(), "
            ".isoformat(), list()) before it enters a saga",
        )


def _size(value: Any, where: str, max_bytes: int) -> int:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # a subclass with odd __iter__
        raise _refuse(TYPE, where, f"is not JSON: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise _refuse(
            SIZE,
            where,
            f"is {size} bytes of JSON, over the limit of {max_bytes} (setting max_payload_bytes)",
        )
    return size


def _render(where: str, path: Any) -> str:
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    return where + "".join(f"[{k!r}]" for k in reversed(keys))


def _refuse(rule: str, where: str, problem: str) -> InputError:
    return InputError(f"{where}: {problem}", rule=rule, where=where)
