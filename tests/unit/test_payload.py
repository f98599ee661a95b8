"""What a message can carry: the rules of sagaline/payload.py, one by one."""

from __future__ import annotations

import json
import math
import pickle
import re
from datetime import datetime
from typing import Any

import pytest
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from sagaline import payload
from sagaline.exceptions import IdempotencyConflict, InputError
from sagaline.payload import MAX_DEPTH, check_object, check_output, check_value

LIMIT = 64 * 1024


def nested(depth: int, leaf: Any = 1) -> Any:
    """`depth` dicts inside each other around `leaf`."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def refusal(fn: Any, value: Any, where: str = "input") -> InputError:
    with pytest.raises(InputError) as info:
        fn(value, where, max_bytes=LIMIT)
    return info.value


@pytest.mark.parametrize(
    ("value", "rule", "message"),
    [
        (
            {"x": {7: "seven"}},
            "key",
            r"^input\['x'\]: key 7 \(int\) is not a string; JSON object keys",
        ),
        ({"x": {1: "a", "1": "b"}}, "key", r"key 1 \(int\) is not a string"),
        ({"x": [1.0, math.nan]}, "number", r"^input\['x'\]\[1\]: nan is not JSON"),
        ({"x": math.inf}, "number", r"^input\['x'\]: inf is not JSON"),
        ({"x": "a\x00b"}, "text", r"^input\['x'\]: the string contains a NUL"),
        ({"x": {"k\x00": 1}}, "text", r"^input\['x'\]: the key 'k\\x00' contains a NUL"),
        ({"x": "\ud800"}, "text", r"lone surrogate"),
        ({"x": {"__type__": "nosuch", "__value__": 1}}, "envelope", r"^input\['x'\]: .*kombu"),
        ({"x": {"__type__": "datetime", "__value__": "2024-01-01T00:00:00"}}, "envelope", "kombu"),
        ({"x": datetime(2024, 1, 1)}, "type", r"^input\['x'\]: type datetime is not JSON"),
        ({"x": {1, 2}}, "type", r"type set is not JSON"),
        ({"x": b"bytes"}, "type", r"type bytes is not JSON"),
        ({"x": 10**5000}, "number", r"integer this large"),
        ({"saga_id": "mine"}, "reserved", r"^input\['saga_id'\]: 'saga_id' is a reserved"),
        ({"compensation_data": 1}, "reserved", r"'compensation_data' is a reserved"),
    ],
)
def test_each_rule_is_refused_with_its_name_and_where(value: Any, rule: str, message: str) -> None:
    err = refusal(check_object, value)
    assert err.rule == rule
    assert err.where is not None and str(err).startswith(err.where)
    assert re.search(message, str(err))


def test_reserved_keys_are_refused_only_at_the_top_of_an_object() -> None:
    check_object({"nested": {"saga_id": "x", "compensation_data": 1}}, "input", max_bytes=LIMIT)
    check_value({"saga_id": "x"}, "compensation_data", max_bytes=LIMIT)
    check_output(["saga_id"], "output", max_bytes=LIMIT)


def test_an_envelope_needs_exactly_the_two_kombu_keys() -> None:
    # kombu decodes only objects whose keys are exactly __type__ and __value__.
    check_object({"x": {"__type__": "t", "__value__": 1, "other": 2}}, "input", max_bytes=LIMIT)
    check_object({"x": {"__type__": "t"}}, "input", max_bytes=LIMIT)
    assert kombu_loads(kombu_dumps({"__type__": "t", "other": 2})) == {"__type__": "t", "other": 2}


def test_nesting_is_counted_from_the_context_object() -> None:
    # The input object is level 1: its values may nest MAX_DEPTH - 1 containers.
    check_object(nested(MAX_DEPTH), "input", max_bytes=LIMIT)
    err = refusal(check_object, nested(MAX_DEPTH + 1))
    assert err.rule == "depth"
    assert str(err) == ("input" + "['a']" * MAX_DEPTH + f": nesting deeper than {MAX_DEPTH} levels")
    # A value stored under one name sits one level down in the context.
    check_value(nested(MAX_DEPTH - 1), "compensation_data", max_bytes=LIMIT)
    assert refusal(check_value, nested(MAX_DEPTH)).rule == "depth"
    assert refusal(check_output, [nested(MAX_DEPTH - 1)]).rule == "depth"
    check_output(nested(MAX_DEPTH), "output", max_bytes=LIMIT)  # a dict merges at the top


@pytest.mark.parametrize("depth", [480, 990, 5000, 100_000])
def test_any_depth_is_refused_without_recursion_error(depth: int) -> None:
    # 480 levels killed a prefork worker's main process while pickling; deeper
    # ones raised RecursionError out of json.dumps.
    value: Any = 1
    for _ in range(depth):
        value = [value]
    assert refusal(check_output, value).rule == "depth"
    assert refusal(check_object, {"x": value}).rule == "depth"


def test_the_depth_limit_is_far_below_what_prefork_pickling_survives() -> None:
    # A worker's main process pickles each message for its pool child: a message of
    # the largest accepted depth (context, kwargs, Celery's body) must pickle with
    # hundreds of frames already on the stack.
    message = [[], nested(MAX_DEPTH), {}]

    def deep(frames: int) -> bytes:
        return pickle.dumps(message) if frames == 0 else deep(frames - 1)

    assert deep(300)


def test_cycles_and_shared_structures_end_at_a_limit() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert refusal(check_object, cyclic).rule == "depth"
    # 2**25 paths through 25 shared lists: refused after at most LIMIT visits.
    shared: Any = [1]
    for _ in range(25):
        shared = [shared, shared]
    assert refusal(check_value, shared).rule == "size"


def test_size_is_the_compact_utf8_json_of_the_document() -> None:
    value = {"s": "é" * 100}
    size = check_object(value, "input", max_bytes=LIMIT)
    assert size == len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    assert size == len('{"s":""}') + 200
    with pytest.raises(InputError) as info:
        check_object(value, "input", max_bytes=size - 1)
    err = info.value
    assert err.rule == "size"
    assert f"is {size} bytes of JSON, over the limit of {size - 1}" in str(err)
    assert check_object(value, "input", max_bytes=size) == size


def test_plain_json_passes_and_keeps_its_values() -> None:
    value = {
        "s": "text ✓ 😀",
        "n": -3,
        "f": 0.5,
        "b": True,
        "z": None,
        "l": [1, [2, {}]],
        "t": (1, 2),
        "big": 2**70,
        "": "empty key",
        "__type__": "alone",
    }
    check_object(value, "input", max_bytes=LIMIT)
    assert kombu_loads(kombu_dumps(value))["l"] == [1, [2, {}]]


def test_check_text_names_the_limit() -> None:
    payload.check_text("k" * 255, "idempotency_key", limit=255)
    with pytest.raises(InputError, match=r"is 256 characters long, over the limit of 255"):
        payload.check_text("k" * 256, "idempotency_key", limit=255)
    with pytest.raises(InputError, match="NUL"):
        payload.check_text("a\x00", "idempotency_key", limit=255)
    with pytest.raises(InputError, match="must not be empty"):
        payload.check_text("", "idempotency_key", limit=255)
    with pytest.raises(TypeError):
        payload.check_text(5, "idempotency_key", limit=255)


def test_input_fingerprints_are_equal_exactly_for_equal_json() -> None:
    fp = payload.fingerprint
    assert fp({"a": 1, "b": [1, 2]}) == fp({"b": (1, 2), "a": 1})
    assert fp({"a": 1}) != fp({"a": 2})
    assert fp({"a": 1}) != fp({"a": "1"})


def test_idempotency_conflict_is_an_input_error_with_fields() -> None:
    err = IdempotencyConflict("order", "k-1", "abc")
    assert isinstance(err, InputError)
    assert (err.saga_name, err.idempotency_key, err.saga_id) == ("order", "k-1", "abc")
    assert err.rule == "idempotency"
    assert "'k-1'" in str(err) and "abc" in str(err)


def test_input_errors_keep_their_fields_across_processes() -> None:
    err = pickle.loads(
        pickle.dumps(InputError("input['a']: bad", rule="depth", where="input['a']"))
    )
    assert (str(err), err.rule, err.where) == ("input['a']: bad", "depth", "input['a']")
    conflict = pickle.loads(pickle.dumps(IdempotencyConflict("order", "k-1", "abc")))
    assert (conflict.saga_name, conflict.idempotency_key, conflict.saga_id) == (
        "order",
        "k-1",
        "abc",
    )
    assert str(conflict) == str(IdempotencyConflict("order", "k-1", "abc"))
