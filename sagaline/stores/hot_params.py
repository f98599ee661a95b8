"""The parameters of the hot statements (pg_hot.py on psycopg, sqlite_hot.py on sqlite3):
a record's row with its JSON columns encoded as the driver takes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from ..records import Event
from .rows import to_row
from .schema import events, sagas, steps


def _json_columns(table: sa.Table) -> frozenset[str]:
    return frozenset(c.name for c in table.c if isinstance(c.type, sa.JSON))


SAGA_JSON = _json_columns(sagas)
STEP_JSON = _json_columns(steps)
EVENT_JSON = _json_columns(events)
EVENT_COLUMNS = [c.name for c in events.c if c.name != "seq"]


class HotParams:
    """Rows as named parameters; `encode` turns a JSON column's value into what the
    driver stores (None stays JSON null, as SQLAlchemy's JSON type writes it)."""

    def __init__(self, encode: Callable[[Any], Any]):
        self.encode = encode

    def row(self, record: Any, json_columns: frozenset[str]) -> dict[str, Any]:
        return self._encoded(to_row(record), json_columns)

    def versioned(self, record: Any, json_columns: frozenset[str], version: int) -> dict[str, Any]:
        """A compare-and-set's parameters: the record at `version + 1`, read at `version`."""
        row = self.row(record, json_columns)
        row.update(version=version + 1, k_version=version)
        return row

    def event(self, e: Event) -> dict[str, Any]:
        row = to_row(e)
        row["detail"] = e.detail or None  # an empty detail is stored as null
        return self._encoded({c: row[c] for c in EVENT_COLUMNS}, EVENT_JSON)

    def _encoded(self, row: dict[str, Any], json_columns: frozenset[str]) -> dict[str, Any]:
        encode = self.encode
        for name in json_columns:
            row[name] = encode(row[name])
        return row
