"""A sweeper pass makes progress past what it cannot repair, and reports what it did
(memory store, no servers)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

import sagaline
from sagaline import Saga, ops
from sagaline.records import Dispatch
from sagaline.runtime import Runtime
from sagaline.stores.memory import MemoryStore
from sagaline.sweeper import RepairKind

app = Celery("sweeper_progress", broker="memory://")


@app.task(name="sweeper_progress.noop", shared=False)
def noop(**_: Any) -> None:
    return None


saga = Saga("sweeper_progress").add_step(noop, name="a", no_compensation=True)


def one_foreign_and_one_ours_due() -> tuple[MemoryStore, Runtime, list[Dispatch], str, str]:
    """Two sagas whose first message is due again: one with code no process here has."""
    store = MemoryStore()
    rt = sagaline.init_app(app, store=store, sweeper=False, redispatch_after=0.05)
    published: list[Dispatch] = []
    rt.publish = published.extend  # type: ignore[method-assign]
    foreign = rt.start_saga(saga, {}).saga_id
    ours = rt.start_saga(saga, {}).saga_id
    store._sagas[foreign].fingerprint = "deployed-elsewhere"  # no process here has its code
    published.clear()
    time.sleep(0.1)
    return store, rt, published, foreign, ours


def test_an_item_that_cannot_be_repaired_is_pushed_back_and_the_next_one_is_reached() -> None:
    store, rt, published, foreign, ours = one_foreign_and_one_ours_due()

    assert sagaline.sweep(rt, limit=1) == 1  # the oldest item: pushed back, not repaired
    assert published == []
    assert store.get_steps(foreign)[0].due_at > time.time()  # type: ignore[operator]
    assert sagaline.sweep(rt, limit=1) == 1  # so the next pass reaches the other saga
    assert [(d.saga_id, d.step, d.attempt) for d in published] == [(ours, "a", 1)]
    assert [e.kind for e in store.history(foreign)] == ["saga_started", "step_dispatched"]


def test_the_report_names_the_republished_step_and_the_postponed_one() -> None:
    _, rt, _, foreign, ours = one_foreign_and_one_ours_due()

    report = ops.sweep_report(rt)

    assert report.due == 2 and report.failed == []
    assert [(r.saga_id, r.step, r.kind) for r in report.repaired] == [
        (foreign, "a", RepairKind.POSTPONED),
        (ours, "a", RepairKind.REDISPATCHED),
    ]
    assert report.acted == 2
    assert report.by_kind() == {RepairKind.POSTPONED: 1, RepairKind.REDISPATCHED: 1}


def test_a_pass_with_nothing_due_reports_nothing() -> None:
    rt = sagaline.init_app(app, store=MemoryStore(), sweeper=False, redispatch_after=60)
    rt.publish = lambda dispatches: None  # type: ignore[method-assign,assignment]
    rt.start_saga(saga, {})

    report = ops.sweep_report(rt)

    assert (report.due, report.repaired, report.failed) == (0, [], [])
