"""Step records decoded once per stored row: a decision reads all of a saga's steps,
but between two decisions of a saga only the steps claimed or decided on changed.

Decoding a step row (its JSON columns, then the record) costs far more than reading
it, and a long saga's decisions each decoded every step again: at 64 steps most of
a step's client time. Here each step's last row is kept beside its record; a row
equal to the one kept (every column, compared as the driver returned them) gives
back that record. Equal rows make equal records, so nothing depends on versions
or on who wrote the row.

Records handed out are shared between reads: the engine decides on copies
(work.py) and never changes a record it was given, as with the Redis store's cache
(redis_cache.py). At most `limit` step records are kept, the sagas least recently
read dropped first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..forking import child_safe_lock
from ..records import Decision, StepRecord
from ..states import SAGA_TERMINAL
from .hot_params import STEP_JSON
from .rows import from_row

DEFAULT_LIMIT = 1024


def text_json_row(
    names: Sequence[str], row: Sequence[Any], json_columns: frozenset[str]
) -> dict[str, Any]:
    """A row as a mapping, its JSON columns decoded from their text (as SQLite stores
    them and PostgreSQL's `::text` reads them)."""
    values = dict(zip(names, row, strict=True))
    for name in json_columns:
        text = values.get(name)
        if text is not None:
            values[name] = json.loads(text)
    return values


def step_record(names: Sequence[str], row: tuple[Any, ...]) -> StepRecord:
    return from_row(StepRecord, text_json_row(names, row, STEP_JSON))


class StepRowMemo:
    def __init__(
        self,
        decode: Callable[[Sequence[str], tuple[Any, ...]], StepRecord] = step_record,
        limit: int = DEFAULT_LIMIT,
    ):
        self._decode = decode
        self.limit = limit
        self._lock = child_safe_lock()
        # saga id -> step name -> (the row last read, its record)
        self._sagas: OrderedDict[str, dict[str, tuple[tuple[Any, ...], StepRecord]]] = OrderedDict()
        self._held = 0

    def records(
        self, saga_id: str, names: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> list[StepRecord]:
        """The records of the saga's step `rows` (column `names`), in their order."""
        at = names.index("name")
        with self._lock:
            before = self._sagas.pop(saga_id, {})
            self._held -= len(before)
        kept: dict[str, tuple[tuple[Any, ...], StepRecord]] = {}
        out = []
        for row in rows:
            found = before.get(row[at])
            record = found[1] if found is not None and found[0] == row else self._decode(names, row)
            kept[row[at]] = (row, record)
            out.append(record)
        with self._lock:
            if saga_id not in self._sagas:  # another thread may have put a newer read
                self._sagas[saga_id] = kept
                self._held += len(kept)
            while self._held > self.limit and self._sagas:
                _, dropped = self._sagas.popitem(last=False)
                self._held -= len(dropped)
        return out

    def written(self, saga_id: str, decision: Decision) -> None:
        """A decision was committed: a saga it ended is read again only by a rollback
        or a resume, and is held no longer."""
        if decision.saga is not None and decision.saga.status in SAGA_TERMINAL:
            self.forget(saga_id)

    def forget(self, saga_id: str) -> None:
        with self._lock:
            dropped = self._sagas.pop(saga_id, {})
            self._held -= len(dropped)
