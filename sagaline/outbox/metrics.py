"""Outbox and inbox metrics, when prometheus-client is installed (else nothing).

sagaline_outbox_pending / sagaline_outbox_oldest_age_seconds (gauges, read from the
outbox by a relay at most every 30 s), sagaline_outbox_published_total and
sagaline_outbox_publish_failures_total (by destination), sagaline_outbox_relay_lag_seconds
(histogram: insert to confirm), sagaline_outbox_dead_letters_total,
sagaline_inbox_duplicates_total (by consumer).
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

prometheus: Any
try:
    import prometheus_client as prometheus
except ImportError:  # pragma: no cover - depends on the environment
    prometheus = None

_m: dict[str, Any] = {}
if prometheus is not None:
    Counter, Gauge, Histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
    _m = {
        "pending": Gauge("sagaline_outbox_pending", "Outbox rows waiting to be sent"),
        "oldest": Gauge(
            "sagaline_outbox_oldest_age_seconds", "Age of the oldest pending outbox row"
        ),
        "published": Counter(
            "sagaline_outbox_published_total",
            "Outbox events confirmed by a destination",
            ["destination"],
        ),
        "failures": Counter(
            "sagaline_outbox_publish_failures_total", "Outbox sends that failed", ["destination"]
        ),
        "lag": Histogram(
            "sagaline_outbox_relay_lag_seconds",
            "From outbox insert to the destination's confirm",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        ),
        "dead": Counter(
            "sagaline_outbox_dead_letters_total", "Outbox events moved to dead letters"
        ),
        "dups": Counter(
            "sagaline_inbox_duplicates_total",
            "Messages an inbox recognised as already processed",
            ["consumer"],
        ),
    }
_last_gauge = 0.0


def sent(destination: str, created_at: float, why: str | None) -> None:
    if not _m:
        return
    if why is None:
        _m["published"].labels(destination).inc()
        _m["lag"].observe(max(0.0, time.time() - created_at))
    else:
        _m["failures"].labels(destination).inc()


def dead_letter() -> None:
    if _m:
        _m["dead"].inc()


def inbox_duplicate(consumer: str) -> None:
    if _m:
        _m["dups"].labels(consumer).inc()


def polled(relay: Any) -> None:
    """Refresh the pending gauges (one query, at most every 30 s)."""
    global _last_gauge
    now = time.time()
    if not _m or now - _last_gauge < 30:
        return
    _last_gauge = now
    from ..stores.schema import outbox
    from .events import PENDING

    with relay.engine.connect() as conn:
        n, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)).where(
                outbox.c.status == PENDING
            )
        ).one()
    _m["pending"].set(n)
    _m["oldest"].set(0 if oldest is None else max(0.0, now - oldest))
