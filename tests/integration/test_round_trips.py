"""Per step on the happy path, the store sees a small, fixed number of round trips.

This replays exactly what a worker does for each step (claim, then complete under
the saga's lock) against a real PostgreSQL store, counting every statement and
transaction on the wire. The figure is written down in the README's design notes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

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


class StatementCounter:
    def __init__(self, engine_: sa.Engine):
        self.counts: Counter[str] = Counter()
        sa.event.listen(engine_, "before_cursor_execute", self._statement)
        sa.event.listen(engine_, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        words = statement.split()
        verb = words[0].upper()
        table = next((w for w in words if w.startswith("sagaline_")), "")
        self.counts[f"{verb} {table}".strip()] += 1

    def _commit(self, conn: Any) -> None:
        self.counts["COMMIT"] += 1

    def total(self) -> int:
        return sum(self.counts.values())


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


def run_saga_like_a_worker(rt: Runtime, saga: Saga, counter: StatementCounter
                           ) -> list[Counter[str]]:
    handle = rt.start_saga(saga, {"n": 1})
    per_step: list[Counter[str]] = []
    for name in saga.graph.order:
        before = Counter(counter.counts)
        now = time.time()
        assert rt.store.claim_step(handle.saga_id, name, Phase.FORWARD, 1,
                                   lease_until=now + 60, now=now)
        rt.store.transact(handle.saga_id, lambda st, n=name: engine.step_succeeded(
            saga, st, n, 1, output={f"{n}_out": 1}, compensation_data=None,
            has_compensation_data=False, now=time.time(), timing=rt.timing))
        per_step.append(counter.counts - before)
    assert handle.status is SagaStatus.COMPLETED
    return per_step


def test_each_step_costs_the_same_few_round_trips_whatever_the_saga_length(
        store: SQLStore) -> None:
    rt = Runtime(Celery("rt-client", broker="memory://"), Settings.from_env(
        store_url=store.url), store=store)
    rt.publish = lambda dispatches: None  # type: ignore[method-assign]
    counter = StatementCounter(store.engine)
    results = {}
    for length in (4, 16):
        saga = Saga(f"round_trips_{length}")
        for i in range(length):
            saga.add_step(noop, name=f"s{i}", no_compensation=True)
        results[length] = run_saga_like_a_worker(rt, saga, counter)

    middle = [c for per_step in results.values() for c in per_step[:-1]]
    # Claim: one autocommitted statement (the compare-and-set feeds the event insert).
    # Complete: lock the saga row, read saga + steps, one pipelined UPDATE of the
    # changed steps (this one and its successor), one INSERT of the events, COMMIT.
    expected = {"WITH sagaline_steps": 1, "SELECT sagaline_sagas.saga_id": 2,
                "UPDATE sagaline_steps": 1, "INSERT sagaline_events": 1, "COMMIT": 1}
    for c in middle:
        assert dict(c) == expected, dict(c)
        assert c["UPDATE sagaline_sagas"] == 0  # no saga document rewritten per step
    for per_step in results.values():
        last = per_step[-1]
        assert last["UPDATE sagaline_sagas"] == 1  # only the final transition touches it
        assert sum(last.values()) == 7
