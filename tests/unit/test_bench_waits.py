"""The benchmark's waits end: on time, with a message naming what did not finish."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

import sagaline
from bench.waits import BenchRunFailed, BenchTimeout, TaskResults, poll_pauses, wait_sagas
from sagaline import SagaStatus


class FakeBackend:
    """The three calls TaskResults makes on Celery's RedisBackend, over a dict."""

    def __init__(self, stored: dict[str, dict[str, Any]]) -> None:
        self.stored = stored
        self.reads = 0

    def get_key_for_task(self, task_id: str) -> str:
        return f"celery-task-meta-{task_id}"

    def mget(self, keys: list[str]) -> list[str | None]:
        self.reads += 1
        return [
            json.dumps(self.stored[k.removeprefix("celery-task-meta-")])
            if k.removeprefix("celery-task-meta-") in self.stored
            else None
            for k in keys
        ]

    def decode_result(self, raw: str) -> dict[str, Any]:
        return dict(json.loads(raw))


def results_over(stored: dict[str, dict[str, Any]]) -> tuple[TaskResults, FakeBackend]:
    results = TaskResults.__new__(TaskResults)
    backend = FakeBackend(stored)
    results.backend = backend
    return results, backend


def test_poll_pauses_stop_at_the_deadline_and_back_off() -> None:
    started = time.monotonic()
    pauses = []
    for pause in poll_pauses(0.3, first=0.002, fast=0.005, slow=0.1, fast_for=0.1):
        pauses.append(pause)
        time.sleep(pause)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert pauses[0] == 0.002 and max(pauses[:5]) <= 0.005
    assert max(pauses) > 0.005  # backed off after fast_for


def test_waiting_for_finished_chains_reads_once() -> None:
    results, backend = results_over({"a": {"status": "SUCCESS"}, "b": {"status": "SUCCESS"}})
    results.wait(["a", "b"], timeout=5, what="T1 baseline")
    assert backend.reads == 1


def test_a_chain_that_never_finishes_times_out_naming_it() -> None:
    results, _ = results_over({"a": {"status": "SUCCESS"}, "b": {"status": "STARTED"}})
    started = time.monotonic()
    with pytest.raises(BenchTimeout) as err:
        results.wait(["a", "b", "c"], timeout=0.3, what="[redis] T1 baseline")
    assert time.monotonic() - started < 2.0
    assert str(err.value) == (
        "[redis] T1 baseline: 2 of 3 chains not finished after 0.3s (first: task b, STARTED)"
    )


def test_a_failed_task_fails_the_wait_at_once() -> None:
    results, _ = results_over({"a": {"status": "FAILURE", "result": "boom"}})
    with pytest.raises(BenchRunFailed, match="task a ended FAILURE"):
        results.wait(["a"], timeout=30, what="L1 baseline")


class StuckHandle:
    def __init__(self, saga_id: str, status: SagaStatus) -> None:
        self.saga_id = saga_id
        self.status = status

    def get(self, timeout: float | None = None) -> None:
        if self.status is SagaStatus.COMPLETED:
            return
        if self.status is SagaStatus.COMPENSATED:
            raise sagaline.SagaCompensated(self.saga_id, "boom")
        time.sleep(timeout or 0)
        raise sagaline.SagaTimeout(self.saga_id, timeout or 0, self.status.value)


def test_sagas_that_do_not_end_time_out_counting_the_unfinished() -> None:
    handles = [
        StuckHandle("s1", SagaStatus.COMPLETED),
        StuckHandle("s2", SagaStatus.RUNNING),
        StuckHandle("s3", SagaStatus.COMPLETED),
        StuckHandle("s4", SagaStatus.PENDING),
    ]
    started = time.monotonic()
    with pytest.raises(BenchTimeout) as err:
        wait_sagas(handles, timeout=0.2, what="[sqlite] T1")
    assert time.monotonic() - started < 2.0
    assert str(err.value) == (
        "[sqlite] T1: 2 of 4 sagas not finished after 0.2s (first: saga s2, RUNNING)"
    )


def test_a_compensated_saga_fails_the_wait_unless_allowed() -> None:
    handles = [StuckHandle("s1", SagaStatus.COMPENSATED)]
    wait_sagas(handles, timeout=1, what="L2", compensated_ok=True)
    with pytest.raises(sagaline.SagaCompensated):
        wait_sagas(handles, timeout=1, what="L1")
