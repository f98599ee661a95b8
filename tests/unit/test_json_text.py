"""The Redis store's hash values: each is the JSON of one record field, written and read
without json.dumps/json.loads for the common values (stores/json_text.py: json_value and
json_loads), and exactly as those would."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sagaline.stores.json_text import json_loads, json_value

json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@given(json_values)
def test_a_value_is_written_as_json_dumps_writes_it(value: Any) -> None:
    assert json_value(value) == json.dumps(value)


@given(json_leaves)
def test_a_written_value_reads_back_as_json_loads_reads_it(value: Any) -> None:
    text = json_value(value)
    assert same(json_loads(text), json.loads(text))


def test_the_values_records_hold() -> None:
    cases = [
        None, True, False, 0, -7, 2**70, 1.5, 1e300, -0.0, 1700000000.123456,
        float("inf"), float("-inf"), "", "plain", 'a "quoted" word', "back\\slash",
        "caf\u00e9", "\u2603 snow", "line\nbreak", "nul\0", {"k": [1, 2.5, None]}, [],
    ]  # fmt: skip
    for value in cases:
        text = json_value(value)
        assert text == json.dumps(value), value
        assert same(json_loads(text), json.loads(text)), value
    assert math.isnan(json_loads(json_value(float("nan"))))


def test_text_that_only_looks_like_a_plain_string_is_left_to_the_decoder() -> None:
    # An escaped quote or unicode escape goes through json.loads, which undoes it.
    assert json_loads('"say \\"hi\\""') == 'say "hi"'
    assert json_loads('"\\u00e9"') == "\u00e9"
    assert json_loads('"1"') == "1"
    assert json_loads("1") == 1
