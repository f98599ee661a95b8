"""Metrics without servers: signals become samples, gauges come from the store (cached,
never hanging on an outage), the queue wait of a re-published step starts at its first
dispatch, and the settings refuse what cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry

from sagaline import engine, recovery, signals
from sagaline.config import Settings
from sagaline.definition import Saga
from sagaline.exceptions import ConfigurationError
from sagaline.observability import metrics
from sagaline.states import Phase, SagaStatus
from sagaline.stores.memory import MemoryStore
from sagaline.sweeper import RepairKind

app = Celery("t_metrics", broker="memory://", set_as_current=False)


@app.task(name="metrics_test.book", shared=False)
def book(**ctx: Any) -> None: ...


@app.task(name="metrics_test.pay", shared=False)
def pay(**ctx: Any) -> None: ...


trip = Saga("metrics_test_trip", timeout=60).add_step(book).add_step(pay)
TIMING = engine.Timing(redispatch_after=30.0)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.SagaMetrics(registry))
    for signal, receiver in metrics._RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"test.{signal.name}")
    yield registry
    for signal, _ in metrics._RECEIVERS:
        signal.disconnect(dispatch_uid=f"test.{signal.name}")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_lifecycle_signals_become_counters_and_histograms(registry: CollectorRegistry) -> None:
    signals.saga_started.send(sender=None, saga_id="s1", name="trip")
    signals.step_started.send(
        sender=None,
        saga_id="s1",
        name="trip",
        step="book",
        phase=Phase.FORWARD,
        attempt=1,
        queue_wait=0.2,
    )
    signals.step_started.send(
        sender=None,
        saga_id="s1",
        name="trip",
        step="book",
        phase=Phase.FORWARD,
        attempt=2,
        queue_wait=None,
    )
    signals.step_finished.send(
        sender=None,
        saga_id="s1",
        name="trip",
        step="book",
        phase=Phase.FORWARD,
        attempt=1,
        outcome="failed",
        duration=0.5,
    )
    signals.step_finished.send(
        sender=None,
        saga_id="s1",
        name="trip",
        step="book",
        phase=Phase.COMPENSATE,
        attempt=1,
        outcome="succeeded",
        duration=0.1,
    )
    signals.saga_finished.send(
        sender=None, saga_id="s1", name="trip", status=SagaStatus.COMPENSATED, duration=3.0
    )
    signals.sweeper_repaired.send(
        sender=None, counts={RepairKind.REDISPATCHED: 2, RepairKind.DEADLINE: 0}
    )
    signals.sweeper_repaired.send(sender=None, counts={"worker_lost": 1})

    assert value(registry, "sagaline_sagas_started_total", saga="trip") == 1
    assert value(registry, "sagaline_sagas_finished_total", saga="trip", status="compensated") == 1
    assert (
        value(registry, "sagaline_saga_duration_seconds_sum", saga="trip", status="compensated")
        == 3.0
    )
    assert (
        value(
            registry,
            "sagaline_step_attempts_total",
            saga="trip",
            step="book",
            phase="forward",
            outcome="failed",
        )
        == 1
    )
    assert (
        value(
            registry, "sagaline_compensations_total", saga="trip", step="book", outcome="succeeded"
        )
        == 1
    )
    assert (
        value(
            registry,
            "sagaline_step_duration_seconds_count",
            saga="trip",
            step="book",
            phase="compensate",
        )
        == 1
    )
    # A message that does not say when it was dispatched observes no wait.
    assert value(registry, "sagaline_step_queue_wait_seconds_count", saga="trip", step="book") == 1
    assert value(
        registry, "sagaline_step_queue_wait_seconds_sum", saga="trip", step="book"
    ) == pytest.approx(0.2)
    assert value(registry, "sagaline_sweeper_repairs_total", kind="redispatched") == 2
    assert value(registry, "sagaline_sweeper_repairs_total", kind="worker_lost") == 1
    assert registry.get_sample_value("sagaline_sweeper_repairs_total", {"kind": "deadline"}) is None
    signals.retention_deleted.send(
        sender=None, by_status={"COMPLETED": 3, "COMPENSATED": 0}, steps=9, events=20
    )
    assert value(registry, "sagaline_retention_deleted_sagas_total", status="completed") == 3
    assert (
        registry.get_sample_value(
            "sagaline_retention_deleted_sagas_total", {"status": "compensated"}
        )
        is None
    )


def test_store_operations_are_timed_once(registry: CollectorRegistry) -> None:
    store = MemoryStore()
    metrics.instrument_store(store)
    metrics.instrument_store(store)  # a second runtime on the same store: no double count
    store.find_due(time.time())
    store.count_by_status()
    assert value(registry, "sagaline_store_operation_seconds_count", operation="find_due") == 1
    assert (
        value(registry, "sagaline_store_operation_seconds_count", operation="count_by_status") == 1
    )


def start(store: MemoryStore, saga_id: str, now: float) -> None:
    state, decision = engine.start(trip, saga_id, {}, now=now, timing=TIMING)
    store.create_saga(state, decision.events)


def gauges(collector: metrics.StoreGauges) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (f.name, tuple(s.labels.values())): s.value for f in collector.collect() for s in f.samples
    }


def test_in_progress_gauges_are_read_from_the_store_and_cached() -> None:
    store = MemoryStore()
    now = time.time()
    start(store, "late", now - 120)  # past its 60 s timeout, still running
    start(store, "fresh", now)
    collector = metrics.StoreGauges(lambda: store, ttl=60)
    first = gauges(collector)
    assert first[("sagaline_sagas_in_progress", ("metrics_test_trip", "running"))] == 2
    assert first[("sagaline_sagas_in_progress", ("metrics_test_trip", "compensating"))] == 0
    assert first[("sagaline_sagas_past_deadline", ("metrics_test_trip",))] == 1
    assert first[("sagaline_sagas_needing_attention", ("metrics_test_trip",))] == 0
    assert first[("sagaline_store_up", ())] == 1
    start(store, "third", now)
    # Within the cache's lifetime a scrape does not query the store again.
    assert gauges(collector) == first
    assert (
        gauges(metrics.StoreGauges(lambda: store, ttl=0))[
            ("sagaline_sagas_in_progress", ("metrics_test_trip", "running"))
        ]
        == 3
    )


class HangingStore(MemoryStore):
    def count_by_status(self, name: str | None = None) -> dict[SagaStatus, int]:
        time.sleep(30)
        return {}


def test_a_store_that_does_not_answer_does_not_hang_the_scrape() -> None:
    collector = metrics.StoreGauges(lambda: HangingStore())
    began = time.monotonic()
    values = gauges(collector)
    assert time.monotonic() - began < metrics.GAUGE_WAIT + 5
    assert values == {("sagaline_store_up", ()): 0.0}


def test_a_republished_step_counts_its_queue_wait_from_its_first_dispatch() -> None:
    state, first = engine.start(trip, "s", {}, now=100.0, timing=TIMING)
    (dispatch,) = first.dispatches
    assert dispatch.ready_at is None  # published at once: the wait starts at the publish
    once = recovery.redispatch(trip, state, "book", now=131.0, timing=TIMING)
    assert once is not None and once.dispatches[-1].ready_at == 100.0
    state = replace(state, steps={**state.steps, "book": once.steps[0]})
    twice = recovery.redispatch(trip, state, "book", now=192.0, timing=TIMING)
    # Later copies count from the previous publish (the one the store's due time knows).
    assert twice is not None and twice.dispatches[-1].ready_at == 131.0


def test_settings_refuse_a_bad_port_and_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGALINE_METRICS_PORT", "nine")
    with pytest.raises(ConfigurationError, match="SAGALINE_METRICS_PORT"):
        Settings.from_env(store_url="memory://")
    monkeypatch.delenv("SAGALINE_METRICS_PORT")
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        Settings.from_env(store_url="memory://", heartbeat_interval=-1.0)
    import sagaline

    with pytest.raises(ConfigurationError, match="metrics_port must be a TCP port"):
        sagaline.init_app(
            Celery("bad-port", set_as_current=False), store="memory://", metrics_port=70000
        )


def test_a_metrics_port_without_prometheus_client_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from celery import Celery; import sagaline\n"
        "try:\n"
        "    sagaline.init_app(Celery('x'), store='memory://', metrics_port=9540)\n"
        "except sagaline.ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "SAGALINE_HOME": str(tmp_path)},
    )
    assert "pip install 'sagaline[prometheus]'" in out.stdout, out.stderr
