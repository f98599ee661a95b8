"""A sweeper pass reports each item it acted on, by kind (memory store, no servers)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

import sagaline
from sagaline import Saga, ops
from sagaline.records import Dispatch
from sagaline.stores.memory import MemoryStore
from sagaline.sweeper import RepairKind

app = Celery("sweep_report", broker="memory://")


@app.task(name="sweep_report.noop", shared=False)
def noop(**_: Any) -> None:
    return None


saga = Saga("sweep_report").add_step(noop, name="a", no_compensation=True)


def test_the_report_names_the_republished_step_and_the_postponed_one() -> None:
    store = MemoryStore()
    rt = sagaline.init_app(app, store=store, sweeper=False, redispatch_after=0.05)
    published: list[Dispatch] = []
    rt.publish = published.extend  # type: ignore[method-assign]
    foreign = rt.start_saga(saga, {}).saga_id
    ours = rt.start_saga(saga, {}).saga_id
    store._sagas[foreign].fingerprint = "deployed-elsewhere"  # no process here has its code
    time.sleep(0.1)

    report = ops.sweep_report(rt)

    assert report.due == 2 and report.failed == []
    assert [(r.saga_id, r.step, r.kind) for r in report.repaired] == [
        (foreign, "a", RepairKind.POSTPONED), (ours, "a", RepairKind.REDISPATCHED)]
    assert report.acted == 2
    assert report.by_kind() == {RepairKind.POSTPONED: 1, RepairKind.REDISPATCHED: 1}


def test_a_pass_with_nothing_due_reports_nothing() -> None:
    rt = sagaline.init_app(app, store=MemoryStore(), sweeper=False, redispatch_after=60)
    rt.publish = lambda dispatches: None  # type: ignore[method-assign,assignment]
    rt.start_saga(saga, {})

    report = ops.sweep_report(rt)

    assert (report.due, report.repaired, report.failed) == (0, [], [])
