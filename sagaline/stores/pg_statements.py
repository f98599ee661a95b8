"""The text of PostgreSQL's hot statements (pg_hot.py runs them): the claim, a
decision's read, its write in one statement (write_statement) or as a pipeline of
statements, and a new saga's insert in one statement (create_statement).

The one-statement forms use PostgreSQL's own placeholders ($1, $2 …), for a
RawCursor: psycopg converts `%s` placeholders in Python, with regular expressions,
on every execute once a statement has more than 50 of them.
"""

from __future__ import annotations

import functools
import itertools
import re

import sqlalchemy as sa

from ..records import PHASE_COLUMNS
from ..states import Phase
from .finished import PG_CHANNEL, PG_ENDED_CHANNEL
from .hot_params import EVENT_COLUMNS, STEP_JSON
from .schema import events, sagas, steps

READ_SAGA = f"SELECT * FROM {sagas.name} WHERE saga_id = %s"
LOCK_SAGA = READ_SAGA + " FOR UPDATE"
# JSON columns as their text, decoded by the memo only for the rows that changed.
STEP_COLUMNS = [c.name for c in steps.c]
_STEP_SELECT = ", ".join(f"{n}::text" if n in STEP_JSON else n for n in STEP_COLUMNS)
READ_STEPS = f"SELECT {_STEP_SELECT} FROM {steps.name} WHERE saga_id = %s ORDER BY position"


# A claim in one statement: the compare-and-set feeds the insert of its event, and when
# it won, the saga's steps come back (as READ_STEPS reads them, the claimed one as
# claimed), the claimed step's row carrying the saga row as JSON. One snapshot: the
# steps and the saga as they were when the claim was made.
_CLAIM = """
WITH claimed AS (
    UPDATE sagaline_steps SET {set_status}, lease_until = %(k_lease_until)s,
           due_at = %(k_lease_until)s, owner_node = %(k_owner_node)s,
           owner_boot = %(k_owner_boot)s, owner_pid = %(k_owner_pid)s, version = version + 1
    WHERE saga_id = %(k_saga_id)s AND name = %(k_name)s AND {status_col} = '{dispatched}'
          AND {attempt_col} = %(k_attempt)s
    RETURNING *),
started AS (
    INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase)
    SELECT saga_id, %(k_now)s, %(k_kind)s, %(k_name)s, %(k_attempt)s, %(k_phase)s FROM claimed
    WHERE set_config('synchronous_commit', 'off', true) = 'off')
SELECT {step_columns}, (SELECT row_to_json(g)::text FROM sagaline_sagas AS g
                        WHERE g.saga_id = claimed.saga_id) AS saga_row
FROM claimed
UNION ALL
SELECT {step_columns}, NULL FROM sagaline_steps
WHERE saga_id = %(k_saga_id)s AND name <> %(k_name)s AND EXISTS (SELECT FROM claimed)
ORDER BY position"""


def _claim(phase: Phase) -> str:
    cols = PHASE_COLUMNS[phase]
    set_status = f"{cols.status} = '{cols.running.value}'"
    if phase is Phase.FORWARD:  # a compensation keeps the step's start time
        set_status += ", started_at = %(k_now)s"
    return _CLAIM.format(
        set_status=set_status,
        status_col=cols.status,
        dispatched=cols.dispatched.value,
        attempt_col=cols.attempt,
        step_columns=_STEP_SELECT,
    )


CLAIM = {phase: _claim(phase) for phase in Phase}


def _checked(update: str) -> str:
    """The compare-and-set `update`, failing (division by zero) when it matches no row."""
    return f"WITH changed AS ({update} RETURNING 1) SELECT 1 / count(*) FROM changed"


UPDATE_SAGA = _checked(
    f"UPDATE {sagas.name} SET "
    + ", ".join(f"{c.name} = %({c.name})s" for c in sagas.c if c.name != "saga_id")
    + " WHERE saga_id = %(saga_id)s AND version = %(k_version)s"
)
# The version move of a decision that changes steps but not the saga row itself.
BUMP_SAGA = _checked(
    f"UPDATE {sagas.name} SET version = version + 1"
    " WHERE saga_id = %(saga_id)s AND version = %(k_version)s"
)
# What a decision that only appends events checks without the lock: its saga, unchanged.
HOLD_SAGA = (
    f"SELECT 1 / count(*) FROM (SELECT 1 FROM {sagas.name}"
    " WHERE saga_id = %(saga_id)s AND version = %(k_version)s FOR SHARE) AS held"
)
UPDATE_STEP = _checked(
    f"UPDATE {steps.name} SET "
    + ", ".join(f"{c.name} = %({c.name})s" for c in steps.c if c.name not in ("saga_id", "name"))
    + " WHERE saga_id = %(saga_id)s AND name = %(name)s AND version = %(k_version)s"
)
INSERT_EVENT = (
    f"INSERT INTO {events.name} ({', '.join(EVENT_COLUMNS)}) VALUES ("
    + ", ".join(f"%({c})s" for c in EVENT_COLUMNS)
    + ")"
)
NOTIFY = f"SELECT pg_notify('{PG_CHANNEL}', %s)"
NOTIFY_ENDED = f"SELECT pg_notify('{PG_ENDED_CHANNEL}', %s)"
SAGA_COLUMNS = [c.name for c in sagas.c]
# Read back from a float8 column, an int written there is a float.
SAGA_FLOATS = frozenset(c.name for c in sagas.c if isinstance(c.type, sa.Double))


STEP_COLUMNS_SET = [c for c in STEP_COLUMNS if c not in ("saga_id", "name")]
SAGA_COLUMNS_SET = [c for c in SAGA_COLUMNS if c != "saga_id"]


@functools.lru_cache(maxsize=256)
def write_statement(saga: str, n_steps: int, n_events: int, notify: int) -> str:
    """A decision's write as one statement, its compare-and-sets in data-modifying CTEs:
    `saga` "update" (the row rewritten), "bump" (its version moved on), "hold" (its
    version checked, FOR SHARE) or ""; then `n_steps` step updates, `n_events` event
    rows, and `notify` pg_notify calls (1: the saga's id; 2: the ended saga, then its
    id). A compare-and-set that matches no row makes it divide by zero, which aborts
    it whole. PostgreSQL's own placeholders ($1, $2 …), in the order of the
    parameters `_write` makes, for a RawCursor: psycopg converts `%s` placeholders
    in Python on every execute once a statement has more than 50 of them."""
    ctes, checks = [], []
    if saga == "update":
        sets = ", ".join(f"{c} = %s" for c in SAGA_COLUMNS_SET)
        ctes.append(f"s AS (UPDATE {sagas.name} SET {sets} {_SAGA_WHERE} RETURNING 1)")
    elif saga == "bump":
        ctes.append(
            f"s AS (UPDATE {sagas.name} SET version = version + 1 {_SAGA_WHERE} RETURNING 1)"
        )
    elif saga == "hold":
        ctes.append(f"s AS (SELECT 1 FROM {sagas.name} {_SAGA_WHERE} FOR SHARE)")
    if saga:
        checks.append("(SELECT count(*) FROM s)")
    step_sets = ", ".join(f"{c} = %s" for c in STEP_COLUMNS_SET)
    for i in range(n_steps):
        ctes.append(
            f"t{i} AS (UPDATE {steps.name} SET {step_sets}"
            f" WHERE saga_id = %s AND name = %s AND version = %s RETURNING 1)"
        )
        checks.append(f"(SELECT count(*) FROM t{i})")
    if n_events:
        ctes.append(
            f"e AS (INSERT INTO {events.name} ({', '.join(EVENT_COLUMNS)})"
            f" VALUES {_values(n_events, len(EVENT_COLUMNS))})"
        )
    out = [f"1 / ({' * '.join(checks)})" if checks else "1"]
    if notify == 2:
        out.append(f"pg_notify('{PG_ENDED_CHANNEL}', %s)")
    if notify:
        out.append(f"pg_notify('{PG_CHANNEL}', %s)")
    with_ = f"WITH {', '.join(ctes)} " if ctes else ""
    return _numbered(f"{with_}SELECT {', '.join(out)}")


_SAGA_WHERE = "WHERE saga_id = %s AND version = %s"


def _numbered(statement: str) -> str:
    """`%s` placeholders as PostgreSQL's own, $1, $2 …, in order (for a RawCursor)."""
    numbers = itertools.count(1)
    return re.sub("%s", lambda _: f"${next(numbers)}", statement)


def _values(n_rows: int, n_columns: int) -> str:
    row = "(" + ", ".join(["%s"] * n_columns) + ")"
    return ", ".join([row] * n_rows)


@functools.lru_cache(maxsize=64)
def create_statement(n_steps: int, n_events: int) -> str:
    """A new saga in one statement: its row, `n_steps` step rows, `n_events` event rows."""
    ctes = []
    if n_steps:
        ctes.append(
            f"t AS (INSERT INTO {steps.name} ({', '.join(STEP_COLUMNS)})"
            f" VALUES {_values(n_steps, len(STEP_COLUMNS))})"
        )
    if n_events:
        ctes.append(
            f"e AS (INSERT INTO {events.name} ({', '.join(EVENT_COLUMNS)})"
            f" VALUES {_values(n_events, len(EVENT_COLUMNS))})"
        )
    with_ = f"WITH {', '.join(ctes)} " if ctes else ""
    return _numbered(
        f"{with_}INSERT INTO {sagas.name} ({', '.join(SAGA_COLUMNS)})"
        f" VALUES {_values(1, len(SAGA_COLUMNS))}"
    )


def _insert(table: sa.Table) -> str:
    names = [c.name for c in table.c]
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ("
        + ", ".join(f"%({n})s" for n in names)
        + ")"
    )


INSERT_SAGA = _insert(sagas)
INSERT_STEP = _insert(steps)
