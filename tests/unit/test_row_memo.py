"""stores/row_memo.py: a step row decoded once while it stays the same."""

from __future__ import annotations

from typing import Any

from sagaline.records import StepRecord
from sagaline.stores.row_memo import StepRowMemo, step_record

NAMES = ("saga_id", "name", "position", "status", "output", "version")


def row(name: str, output: str | None = '{"n": 1}', version: int = 1) -> tuple[Any, ...]:
    return ("s1", name, ord(name), "SUCCEEDED", output, version)


class Counting:
    def __init__(self) -> None:
        self.decoded: list[str] = []

    def __call__(self, names: Any, r: tuple[Any, ...]) -> StepRecord:
        self.decoded.append(r[1])
        return step_record(names, r)


def test_an_unchanged_row_gives_back_its_record_and_a_changed_one_is_decoded():
    decode = Counting()
    memo = StepRowMemo(decode)
    first = memo.records("s1", NAMES, [row("a"), row("b")])
    assert [s.output for s in first] == [{"n": 1}, {"n": 1}]
    again = memo.records("s1", NAMES, [row("a"), row("b", '{"n": 2}', version=2)])
    assert again[0] is first[0]
    assert again[1] is not first[1] and again[1].output == {"n": 2} and again[1].version == 2
    assert decode.decoded == ["a", "b", "b"]
    # Another saga with the same step names shares nothing.
    other = memo.records("s2", NAMES, [row("a")])
    assert other[0] is not first[0] and decode.decoded[-1] == "a"


def test_a_forgotten_saga_and_the_least_recently_read_beyond_the_limit_are_decoded_again():
    decode = Counting()
    memo = StepRowMemo(decode, limit=3)
    memo.records("s1", NAMES, [row("a"), row("b")])
    memo.records("s2", NAMES, [row("a"), row("b")])  # 4 held > 3: s1 dropped
    memo.records("s2", NAMES, [row("a"), row("b")])
    assert decode.decoded == ["a", "b", "a", "b"]
    memo.records("s1", NAMES, [row("a"), row("b")])
    assert decode.decoded[-2:] == ["a", "b"]
    memo.forget("s1")
    memo.records("s1", NAMES, [row("a")])
    assert decode.decoded[-1] == "a" and len(decode.decoded) == 7
