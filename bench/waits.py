"""Bounded waits of the benchmark driver: sagas by polling the store, chains by polling Redis.

The plain-Celery baseline's results are read the way sagaline's `handle.get()`
reads a saga: by polling, with the same schedule (every 2-5 ms during the first
second, then backing off to 100 ms). The driver reads the result backend's keys
(`celery-task-meta-<id>`) itself; it never uses `AsyncResult.get()`, whose Redis
pub/sub result consumer can miss a message and then wait forever, and its app has
no result backend, so that sending a task subscribes to nothing.

Every wait has a deadline and a maximum number of polls; when it passes, the wait
raises `BenchTimeout` naming the figure, what did not finish and its last state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from celery import states

READ_BATCH = 500  # result keys per MGET


class BenchTimeout(RuntimeError):
    """A saga or chain did not finish within its deadline."""


class BenchRunFailed(RuntimeError):
    """A baseline task ended in a state the figure did not expect."""


def poll_pauses(
    timeout: float,
    *,
    first: float = 0.002,
    fast: float = 0.005,
    slow: float = 0.1,
    fast_for: float = 1.0,
) -> Iterator[float]:
    """Pauses between polls until `timeout` seconds have passed: SagaHandle.get()'s schedule.

    Bounded twice: by the deadline and by a count (every pause is at least `first`).
    """
    started = time.monotonic()
    deadline = started + timeout
    pause = first
    for _ in range(int(timeout / first) + 2):
        now = time.monotonic()
        if now >= deadline:
            return
        yield min(pause, max(deadline - now, 0.0))
        cap = fast if now - started < fast_for else slow
        pause = min(pause * 1.5, cap)


class TaskResults:
    """Reads Celery task results straight from the keys of the Redis result backend."""

    def __init__(self, app: Any, url: str) -> None:
        from celery.backends.redis import RedisBackend

        # Only used for its key names, MGET and decoding: nothing calls on_task_call
        # on it, so it never starts Celery's pub/sub result consumer.
        self.backend = RedisBackend(app=app, url=url)

    def states(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored meta of each task that has one (a task not yet stored is absent)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(task_ids), READ_BATCH):
            ids = task_ids[i : i + READ_BATCH]
            raw = self.backend.mget([self.backend.get_key_for_task(t) for t in ids])
            for task_id, value in zip(ids, raw, strict=True):
                if value:
                    out[task_id] = self.backend.decode_result(value)
        return out

    def wait(self, task_ids: Sequence[str], *, timeout: float, what: str) -> None:
        """Wait until every task succeeded; BenchTimeout or BenchRunFailed otherwise."""
        pending = list(task_ids)
        last: dict[str, dict[str, Any]] = {}
        for pause in poll_pauses(timeout):
            last = self.states(pending)
            failed = [t for t, m in last.items() if m["status"] in states.PROPAGATE_STATES]
            if failed:
                meta = last[failed[0]]
                raise BenchRunFailed(
                    f"{what}: task {failed[0]} ended {meta['status']}: {meta.get('result')!r}"
                )
            pending = [t for t in pending if last.get(t, {}).get("status") != states.SUCCESS]
            if not pending:
                return
            time.sleep(pause)
        last = self.states(pending)
        pending = [t for t in pending if last.get(t, {}).get("status") != states.SUCCESS]
        if pending:
            state = last.get(pending[0], {}).get("status", "no result stored")
            raise BenchTimeout(
                f"{what}: {len(pending)} of {len(task_ids)} chains not finished "
                f"after {timeout:g}s (first: task {pending[0]}, {state})"
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.backend.client.connection_pool.disconnect()


def wait_sagas(
    handles: Sequence[Any], *, timeout: float, what: str, compensated_ok: bool = False
) -> None:
    """Wait until every saga ended (COMPLETED, or COMPENSATED if allowed) within `timeout`."""
    import sagaline
    from sagaline.states import SAGA_TERMINAL

    deadline = time.monotonic() + timeout
    for n, handle in enumerate(handles):
        try:
            handle.get(timeout=max(0.0, deadline - time.monotonic()))
        except sagaline.SagaTimeout as exc:
            unfinished = sum(1 for h in handles[n:] if h.status not in SAGA_TERMINAL)
            raise BenchTimeout(
                f"{what}: {unfinished} of {len(handles)} sagas not finished "
                f"after {timeout:g}s (first: saga {handle.saga_id}, "
                f"{exc.status})"
            ) from None
        except sagaline.SagaCompensated:
            if not compensated_ok:
                raise
