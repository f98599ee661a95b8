"""`SagaHandle`: a started saga, read from the store, to wait on for its outcome."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import engine
from .exceptions import SagaCompensated, SagaFailed, SagaNotFound, SagaTimeout
from .records import SagaRecord
from .states import SAGA_TERMINAL, CompensationStatus, SagaStatus

if TYPE_CHECKING:
    from .runtime import Runtime
    from .stores.finished import FinishWatch

# While a store's notifications arrive, get() still re-reads a waiting saga this often.
RESYNC = 5.0


class SagaHandle:
    """A started saga. Its status is always read from the store."""

    def __init__(self, runtime: Runtime, saga_id: str, name: str):
        self.runtime = runtime
        self.saga_id = saga_id
        self.name = name

    def record(self) -> SagaRecord:
        saga = self.runtime.store.get_saga(self.saga_id)
        if saga is None:
            raise SagaNotFound(self.saga_id)
        return saga

    @property
    def status(self) -> SagaStatus:
        return self.record().status

    def get(
        self,
        timeout: float | None = None,
        *,
        interval: float = 0.002,
        max_interval: float = 0.1,
        fast_for: float = 1.0,
    ) -> Any:
        """Wait for the saga to end and return its final context.

        On a store that announces ended sagas (PostgreSQL, Redis) the wait wakes on
        the commit that ends the saga; on a SQLite file it peeks at the file's
        change counter (every 0.5 ms during the first second); either way it
        reads the saga once before waiting and once after (on PostgreSQL and Redis
        only before, when the notification carried the ended saga). Elsewhere, or
        while the store's listener is disconnected, it polls every `interval`
        seconds, growing to 5 ms for the first `fast_for` seconds and then to
        `max_interval`.

        Raises SagaCompensated or SagaFailed (with the cause) when it did not complete,
        SagaTimeout when `timeout` seconds pass first.
        """
        watch = self.runtime.store.watch_finished(self.saga_id)
        try:
            saga = self._wait(watch, timeout, interval, max_interval, fast_for)
        finally:
            if watch is not None:
                watch.close()
        if saga.status is SagaStatus.COMPLETED:
            return saga.output
        if saga.status is SagaStatus.COMPENSATED:
            raise SagaCompensated(saga.saga_id, saga.error, step=saga.failed_step, record=saga)
        state = self.runtime.store.read_state(self.saga_id)
        steps = [] if state is None else state.steps.values()
        failures = {
            s.name: engine.first_line(s.comp_error) or "no error recorded"
            for s in steps
            if s.comp_status is CompensationStatus.COMPENSATION_FAILED
        }
        raise SagaFailed(
            saga.saga_id,
            saga.error,
            step=saga.failed_step,
            record=saga,
            compensation_failures=failures,
        )

    def _wait(
        self,
        watch: FinishWatch | None,
        timeout: float | None,
        interval: float,
        max_interval: float,
        fast_for: float,
    ) -> SagaRecord:
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            saga = self.record()
            if saga.status in SAGA_TERMINAL:
                return saga
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SagaTimeout(self.saga_id, timeout or 0, saga.status.value)
            if watch is not None and watch.live:
                # Woken by the commit that ends the saga; the re-read every RESYNC
                # seconds only guards against a notification lost on the way.
                watch.wait(RESYNC if deadline is None else min(RESYNC, deadline - now))
                ended = watch.ended
                if ended is not None and _written_after(ended, saga):
                    return ended  # the saga as that commit wrote it: no need to read it
                continue
            time.sleep(interval)
            # Poll every few ms while most sagas end (the first `fast_for` seconds),
            # then back off so that long sagas cost the store little.
            cap = min(0.005, max_interval) if now - started < fast_for else max_interval
            interval = min(interval * 1.5, cap)

    def __repr__(self) -> str:
        return f"<SagaHandle {self.name} {self.saga_id}>"


def _written_after(ended: SagaRecord, read: SagaRecord) -> bool:
    """Whether the ended saga a notification carried was written after `read`: not
    the end of an earlier run (an operator resumed the saga since), whose
    notification may still be on its way, nor of a removed saga of the same id."""
    return ended.created_at == read.created_at and ended.version > read.version
