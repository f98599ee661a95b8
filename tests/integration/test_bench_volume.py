"""VOL's code path at a tiny size: the database is generated once and then reused, a
month is added and dropped with its events, and the failed sagas are listed.

Benchmarks are not tests: nothing here looks at how fast anything was.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from celery import Celery

import sagaline
from bench.history import EVENTS
from bench.volume import VOL_MONTHS, drop_one_month, ensure_volume, list_failed_latency
from sagaline.stores.pg_partitions import list_partitions, month_start
from tests.harness import drop_database, shared_postgres_url

pytestmark = pytest.mark.timeout(60)

N_EVENTS = 70_000  # 5,000 sagas: 50 of them FAILED


@pytest.fixture
def vol_url() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_test_vol_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


def event_count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM sagaline_events")).scalar_one())
    finally:
        engine.dispose()


def test_volume_is_generated_once_then_a_month_is_dropped_and_failures_listed(
    vol_url: str,
) -> None:
    logged: list[str] = []
    made = ensure_volume(vol_url, N_EVENTS, logged.append)
    assert made["reused"] is False and made["generation_seconds"] > 0
    assert event_count(vol_url) == N_EVENTS
    again = ensure_volume(vol_url, N_EVENTS, logged.append)
    assert again == {"generation_seconds": 0.0, "reused": True, "start": made["start"]}
    assert "reusing" in logged[-1]

    dropped = drop_one_month(vol_url, made["start"], N_EVENTS)
    per_month = N_EVENTS // len(EVENTS) // VOL_MONTHS * len(EVENTS)
    assert dropped["dropped_events"] == per_month
    assert dropped["drop_month_seconds"] > 0
    engine = sa.create_engine(vol_url)
    try:
        with engine.connect() as conn:
            names = [p.name for p in list_partitions(conn)]
    finally:
        engine.dispose()
    assert dropped["dropped_partition"] not in names
    # The history's own months are all there, and all of its events.
    first = month_start(made["start"])
    assert f"sagaline_events_p{first.year:04d}{first.month:02d}" in names
    assert event_count(vol_url) == N_EVENTS

    app = Celery("vol-smoke", broker="memory://")
    runtime = sagaline.init_app(app, store=vol_url, sweeper=False)
    try:
        listing = list_failed_latency(runtime, 3)
        failed = sagaline.list_sagas(status=sagaline.SagaStatus.FAILED, limit=50, runtime=runtime)
    finally:
        runtime.store.close()
    assert listing["median_ms"] > 0
    assert len(failed) == 50
    assert [f.created_at for f in failed] == sorted((f.created_at for f in failed), reverse=True)
