"""The sweeper never gets stuck on an item it cannot repair (memory store, no servers)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

import sagaline
from sagaline import Saga
from sagaline.records import Dispatch
from sagaline.stores.memory import MemoryStore

app = Celery("sweeper_progress", broker="memory://")


@app.task(name="sweeper_progress.noop", shared=False)
def noop(**_: Any) -> None:
    return None


saga = Saga("sweeper_progress").add_step(noop, name="a", no_compensation=True)


def test_an_item_that_cannot_be_repaired_is_pushed_back_and_the_next_one_is_reached() -> None:
    store = MemoryStore()
    rt = sagaline.init_app(app, store=store, sweeper=False, redispatch_after=0.05)
    published: list[Dispatch] = []
    rt.publish = published.extend  # type: ignore[method-assign]
    foreign = rt.start_saga(saga, {}).saga_id
    ours = rt.start_saga(saga, {}).saga_id
    store._sagas[foreign].fingerprint = "deployed-elsewhere"  # no process here has its code
    published.clear()
    time.sleep(0.1)

    assert sagaline.sweep(rt, limit=1) == 1  # the oldest item: pushed back, not repaired
    assert published == []
    assert store.get_steps(foreign)[0].due_at > time.time()  # type: ignore[operator]
    assert sagaline.sweep(rt, limit=1) == 1  # so the next pass reaches the other saga
    assert [(d.saga_id, d.step, d.attempt) for d in published] == [(ours, "a", 1)]
    assert [e.kind for e in store.history(foreign)] == ["saga_started", "step_dispatched"]
