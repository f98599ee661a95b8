"""The store's one read of a saga's state, and the ops reads built on it (memory store)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import sagaline
from sagaline import Saga, SagaNotFound, ops
from sagaline.records import SagaFilter
from sagaline.stores.memory import MemoryStore

app = Celery("read_state", broker="memory://")


@app.task(name="read_state.noop", shared=False)
def noop(**_: Any) -> None:
    return None


saga = (
    Saga("read_state")
    .add_step(noop, name="a", no_compensation=True)
    .add_step(noop, name="b", no_compensation=True)
)


def test_read_state_holds_the_saga_and_its_steps_by_name_and_none_for_no_saga() -> None:
    store = MemoryStore()
    rt = sagaline.init_app(app, store=store, sweeper=False)
    rt.publish = lambda dispatches: None  # type: ignore[method-assign,assignment]
    saga_id = rt.start_saga(saga, {}).saga_id

    state = store.read_state(saga_id)

    assert state is not None and state.saga == store.get_saga(saga_id)
    assert list(state.steps) == [s.name for s in store.get_steps(saga_id)] == ["a", "b"]
    assert store.read_state("no-such-saga") is None


def test_ops_reads_take_a_store_and_need_no_runtime() -> None:
    store = MemoryStore()
    rt = sagaline.init_app(app, store=store, sweeper=False)
    rt.publish = lambda dispatches: None  # type: ignore[method-assign,assignment]
    saga_id = rt.start_saga(saga, {}).saga_id

    view = ops.read_saga(store, saga_id)
    listed = ops.find_sagas(store, SagaFilter(name="read_state"))

    assert view.saga_id == saga_id and [s.name for s in view.steps] == ["a", "b"]
    assert view.history and view.history[0].kind == "saga_started"
    assert [v.saga_id for v in listed] == [saga_id] and listed[0].steps == []
    with pytest.raises(SagaNotFound):
        ops.read_saga(store, "no-such-saga")
