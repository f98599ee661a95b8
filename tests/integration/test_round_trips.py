"""Per step on the happy path, the store sees a small, fixed number of round trips.

This replays exactly what a worker does for each step (claim, then complete on
what the claim read) against a real PostgreSQL store, counting every statement and
transaction on the wire. The figure is written down in the README's design notes.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from psycopg.pq import Trace

from sagaline import Saga, engine
from sagaline.config import Settings
from sagaline.runtime import Runtime
from sagaline.states import Phase, SagaStatus
from sagaline.stores.sql import SQLStore
from tests.harness import drop_database, shared_postgres_url

app = Celery("round_trips", broker="memory://")


@app.task(name="rt.noop")
def noop(**_: Any) -> None:
    return None


class WireCounter:
    """What the store's connections send, read from libpq's own trace (PQtrace).

    Counted at the wire, whatever sends it (SQLAlchemy or psycopg directly): a
    round trip is a Sync (the client then waits for the answers of everything sent
    before it), a statement is an Execute, named by its verb and table.
    """

    MESSAGE = re.compile(r"\n(?=F\t\d+\t|B\t\d+\t)")
    PARSE = re.compile(r'Parse\t "([^"]*)" "(.*)" \d+', re.DOTALL)
    BIND = re.compile(r'Bind\t "[^"]*" "([^"]*)"')

    def __init__(self, engine_: sa.Engine, directory: Path):
        self.directory = directory
        # One trace per connection: prepared statements are named per connection.
        self._files: list[Any] = []
        self._pgconns: list[Any] = []
        self._statements: list[dict[str, str]] = []
        sa.event.listen(engine_, "connect", self._trace)
        engine_.dispose()  # connections made from now on are traced

    def _trace(self, dbapi_conn: Any, _record: Any) -> None:
        f = (self.directory / f"libpq-{len(self._files)}.trace").open("w")
        self._files.append(f)
        self._statements.append({})
        self._pgconns.append(dbapi_conn.pgconn)
        self._start_trace(dbapi_conn.pgconn, f)

    @staticmethod
    def _start_trace(pgconn: Any, f: Any) -> None:
        pgconn.trace(f.fileno())
        pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

    def mark(self) -> list[int]:
        # libpq writes its trace through a buffered stream of its own: PQuntrace
        # flushes it, and tracing starts again on the same file.
        for pgconn, f in zip(self._pgconns, self._files, strict=True):
            if not pgconn.status:  # CONNECTION_OK
                pgconn.untrace()
                self._start_trace(pgconn, f)
        return [Path(f.name).stat().st_size for f in self._files]

    def counts(self, start: list[int], end: list[int]) -> Counter[str]:
        """Round trips and statements sent between two marks, on every connection."""
        counts: Counter[str] = Counter()
        for i, f in enumerate(self._files):
            begin = start[i] if i < len(start) else 0
            with Path(f.name).open("rb") as trace:
                data = trace.read(end[i])
            # Statements prepared before the first mark are named in what precedes it.
            self._count(data[:begin].decode(errors="replace"), self._statements[i])
            counts += self._count(data[begin:].decode(errors="replace"), self._statements[i])
        return counts

    def _count(self, text: str, statements: dict[str, str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        current = ""
        for message in self.MESSAGE.split("\n" + text):
            if not message.startswith("F\t"):
                continue
            kind = message.split("\t")[2]
            if kind == "Sync":
                counts["round trips"] += 1
            elif (m := self.PARSE.search(message)) is not None:
                statements[m[1]] = current = m[2]
            elif (m := self.BIND.search(message)) is not None:
                current = statements.get(m[1], current) if m[1] else current
            elif kind == "Execute":
                counts.update(_labels(current))
        return counts


def _labels(statement: str) -> list[str]:
    """What a statement does: its verb and table, or, for a decision's write in one
    statement (pg_hot.write_statement), "write" and each compare-and-set and event
    row in it."""
    words = statement.replace("(", " ").split()
    if words[:2] == ["WITH", "claimed"]:
        return ["claim"]  # the compare-and-set that feeds the `started` event
    if words[:2] == ["WITH", "changed"]:
        words = words[3:]  # a checked compare-and-set: name the UPDATE
    elif words[:1] == ["WITH"] or statement.startswith("SELECT 1 / "):
        found = ["write"]
        found += ["version sagaline_sagas"] * statement.count("SET version = version + 1")
        found += ["UPDATE sagaline_sagas"] * statement.count("UPDATE sagaline_sagas SET name")
        found += ["UPDATE sagaline_steps"] * statement.count("UPDATE sagaline_steps")
        if "INSERT INTO sagaline_events" in statement:
            inserted = statement.split("INSERT INTO sagaline_events", 1)[1]
            values = inserted.split("VALUES", 1)[1].rsplit(" SELECT ", 1)[0]
            found += ["event row"] * values.count("($")  # ($1, $2, …): a row
        found += ["NOTIFY"] * statement.count("pg_notify(")
        return found
    table = next((w for w in words if w.startswith("sagaline_")), "")
    return [f"{words[0].upper()} {table}".strip()]


@pytest.fixture
def store() -> Iterator[SQLStore]:
    url = shared_postgres_url(f"sagaline_rt_{int(time.time() * 1000) % 10**9}")
    s = SQLStore(url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()
        drop_database(url)


def run_saga_like_a_worker(rt: Runtime, saga: Saga, wire: WireCounter) -> list[Counter[str]]:
    handle = rt.start_saga(saga, {"n": 1})
    per_step: list[Counter[str]] = []
    for name in saga.graph.order:
        before = wire.mark()
        now = time.time()
        assert rt.store.claim_step(
            handle.saga_id, name, Phase.FORWARD, 1, lease_until=now + 60, now=now
        )
        rt.store.transact(
            handle.saga_id,
            lambda st, n=name: engine.step_succeeded(
                saga,
                st,
                n,
                1,
                output={f"{n}_out": 1},
                compensation_data=None,
                has_compensation_data=False,
                now=time.time(),
                timing=rt.timing,
            ),
        )
        per_step.append(wire.counts(before, wire.mark()))
    assert handle.status is SagaStatus.COMPLETED
    return per_step


def test_each_step_costs_the_same_few_round_trips_whatever_the_saga_length(
    store: SQLStore, tmp_path: Path
) -> None:
    rt = Runtime(
        Celery("rt-client", broker="memory://"), Settings.from_env(store_url=store.url), store=store
    )
    rt.publish = lambda dispatches: None  # type: ignore[method-assign]
    wire = WireCounter(store.engine, tmp_path)
    # A hot statement's first use on a connection prepares it: one round trip more,
    # once per connection. What a worker pays per step is what follows.
    warm_up = Saga("round_trips_warm_up")
    for i in range(2):  # a middle step and a last one: each writes a statement of its own
        warm_up.add_step(noop, name=f"s{i}", no_compensation=True)
    run_saga_like_a_worker(rt, warm_up, wire)
    results = {}
    for length in (4, 16):
        saga = Saga(f"round_trips_{length}")
        for i in range(length):
            saga.add_step(noop, name=f"s{i}", no_compensation=True)
        results[length] = run_saga_like_a_worker(rt, saga, wire)

    middle = [c for per_step in results.values() for c in per_step[:-1]]
    # Claim, one round trip and one statement, its own transaction: the
    # compare-and-set that feeds the event insert (and turns synchronous_commit off
    # for that transaction), returning the saga's steps and its row. Complete, one
    # statement deciding on what the claim read, its own transaction: the saga row's
    # version moved on (the check that no other decision was written since that
    # read), the compare-and-sets of the changed steps (this one and its successor),
    # their two event rows.
    expected = {
        "round trips": 2,
        "claim": 1,
        "write": 1,
        "version sagaline_sagas": 1,
        "UPDATE sagaline_steps": 2,
        "event row": 2,
    }
    for c in middle:
        assert dict(c) == expected, dict(c)
    for per_step in results.values():
        last = per_step[-1]
        # Only the final transition rewrites the saga row, and announces its end.
        assert last["UPDATE sagaline_sagas"] == 1
        assert last["version sagaline_sagas"] == 0
        assert last["NOTIFY"] == 2  # pg_notify: the ended saga, then its id
        assert (last["write"], last["round trips"]) == (1, 2)
