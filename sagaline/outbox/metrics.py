"""Outbox and inbox metrics, when prometheus-client is installed (else nothing).

sagaline_outbox_pending / sagaline_outbox_oldest_age_seconds (gauges, read from the
outbox by a relay at most every 30 s), sagaline_outbox_published_total and
sagaline_outbox_publish_failures_total (by destination), sagaline_outbox_relay_lag_seconds
(histogram: insert to confirm), sagaline_outbox_dead_letters_total,
sagaline_inbox_duplicates_total (by consumer).

The metrics are created on first use, not at import: in a worker with `metrics_port`
that is after the worker set up prometheus-client's multiprocess mode, so the relay
bootstep (main process) and optimistic sending (pool processes) write sample files that
the worker's `/metrics` sums. Elsewhere they live in the default registry, which
`sagaline relay --metrics-port` serves (`serve`).
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from ..exceptions import ConfigurationError
from ..forking import child_safe_lock, metrics_guard

prometheus: Any
try:
    import prometheus_client as prometheus
except ImportError:  # pragma: no cover - depends on the environment
    prometheus = None

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

_m: dict[str, Any] | None = None
_lock = child_safe_lock()
_last_gauge = 0.0


def _create() -> dict[str, Any]:
    Counter, Gauge, Histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
    return {
        # One relay per process sets these; "livemax" drops a dead process's value.
        "pending": Gauge(
            "sagaline_outbox_pending",
            "Outbox rows waiting to be sent",
            multiprocess_mode="livemax",
        ),
        "oldest": Gauge(
            "sagaline_outbox_oldest_age_seconds",
            "Age of the oldest pending outbox row",
            multiprocess_mode="livemax",
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
            buckets=LAG_BUCKETS,
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


def _metrics() -> dict[str, Any] | None:
    """This process's outbox metrics (created on first use); None without prometheus-client."""
    global _m
    if prometheus is None:
        return None
    if _m is None:
        with _lock:
            if _m is None:
                _m = _create()
    return _m


def prepare() -> None:
    """Create this process's outbox metrics now, in the calling thread."""
    with metrics_guard():
        _metrics()


# Each write runs under metrics_guard(): the relay writes these in a thread of the
# worker's main process, and a pool child forked while it held a lock of
# prometheus-client would hang at its own first write (forking.py).


def sent(destination: str, created_at: float, why: str | None) -> None:
    with metrics_guard():
        m = _metrics()
        if m is None:
            return
        if why is None:
            m["published"].labels(destination).inc()
            m["lag"].observe(max(0.0, time.time() - created_at))
        else:
            m["failures"].labels(destination).inc()


def dead_letter() -> None:
    with metrics_guard():
        m = _metrics()
        if m is not None:
            m["dead"].inc()


def inbox_duplicate(consumer: str) -> None:
    with metrics_guard():
        m = _metrics()
        if m is not None:
            m["dups"].labels(consumer).inc()


def polled(relay: Any) -> None:
    """Refresh the pending gauges (one query, at most every 30 s)."""
    global _last_gauge
    now = time.time()
    if prometheus is None or now - _last_gauge < 30:
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
    with metrics_guard():
        m = _metrics()
        assert m is not None
        m["pending"].set(n)
        m["oldest"].set(0 if oldest is None else max(0.0, now - oldest))


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve this process's default registry (the outbox metrics among it) on `port`,
    for `sagaline relay --metrics-port`; returns the server (its `shutdown()` stops it)."""
    if prometheus is None:
        raise ConfigurationError(
            "--metrics-port (SAGALINE_METRICS_PORT) needs prometheus-client, which is not "
            "installed: pip install 'sagaline[prometheus]'"
        )
    if not 0 < port < 65536:
        raise ConfigurationError(f"the metrics port must be a TCP port (1-65535), got {port}")
    _metrics()  # the outbox metrics are listed from the first scrape on
    try:
        server = prometheus.start_http_server(port, addr=addr)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc}") from None
    return server[0] if isinstance(server, tuple) else server
