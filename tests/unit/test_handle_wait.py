"""`SagaHandle.get()` and the ended saga a notification carries: taken only when newer."""

from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from sagaline.handle import SagaHandle
from sagaline.records import Decision, SagaRecord
from sagaline.states import SagaStatus
from sagaline.stores.finished import FinishWatch
from sagaline.stores.memory import MemoryStore
from tests.stores import counted_reads, make_state


class CarryingWatch(FinishWatch):
    """Wakes at once, carrying `ended`; calls `on_wait` at each wait."""

    def __init__(self, saga_id: str, ended: SagaRecord, on_wait: Any = None):
        self.saga_id = saga_id
        self.ended = ended
        self.waits = 0
        self._on_wait = on_wait or (lambda n: None)

    @property
    def live(self) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        self._on_wait(self.waits)
        return True


def running_saga(store: MemoryStore) -> SagaRecord:
    state = make_state()
    store.create_saga(state, [])
    saga = store.get_saga(state.saga.saga_id)
    assert saga is not None
    return saga


def finish(store: MemoryStore, saga_id: str, output: Any) -> None:
    store.transact(
        saga_id,
        lambda st: Decision(
            saga=replace(st.saga, status=SagaStatus.COMPLETED, output=output),
            saga_version=st.saga.version,
        ),
    )


def test_get_returns_the_ended_saga_a_notification_carried_without_reading_again() -> None:
    store = MemoryStore()
    saga = running_saga(store)
    ended = replace(saga, status=SagaStatus.COMPLETED, output={"n": 1}, version=saga.version + 1)
    watch = CarryingWatch(saga.saga_id, ended)
    store.watch_finished = lambda saga_id: watch  # type: ignore[method-assign]
    handle = SagaHandle(SimpleNamespace(store=store), saga.saga_id, "t")  # type: ignore[arg-type]
    with counted_reads(store) as reads:
        assert handle.get(timeout=5) == {"n": 1}
    assert len(reads) == 1 and watch.waits == 1


def test_get_reads_again_when_the_carried_end_is_older_than_its_first_read() -> None:
    """An end from before the saga was resumed, still on its way, is not the outcome."""
    store = MemoryStore()
    saga = running_saga(store)
    stale = replace(saga, status=SagaStatus.FAILED, version=saga.version - 1)
    ended_for_real = threading.Event()

    def end_at_the_second_wait(n: int) -> None:
        if n == 2:
            finish(store, saga.saga_id, {"real": True})
            ended_for_real.set()

    watch = CarryingWatch(saga.saga_id, stale, end_at_the_second_wait)
    store.watch_finished = lambda saga_id: watch  # type: ignore[method-assign]
    handle = SagaHandle(SimpleNamespace(store=store), saga.saga_id, "t")  # type: ignore[arg-type]
    with counted_reads(store) as reads:
        assert handle.get(timeout=5) == {"real": True}
    assert ended_for_real.is_set() and len(reads) == 3
