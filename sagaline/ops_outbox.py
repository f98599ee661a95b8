"""Operations on the transactional outbox (sagaline/outbox/), for `sagaline relay` and
`sagaline outbox`; `ops` re-exports them for the surfaces."""

from __future__ import annotations

from typing import Any

from .exceptions import ConfigurationError
from .stores.base import redact
from .stores.registry import store_class


def _outbox_store(store_url: str) -> Any:
    from .stores.sql import SQLStore

    if store_class(store_url) is not SQLStore:
        raise ConfigurationError(
            f"the outbox lives in a SQL database; {redact(store_url)} is not one"
        )
    store = SQLStore(store_url, auto_migrate=False)
    if not store.exists():
        store.close()
        raise ConfigurationError(
            f"{redact(store_url)} has no sagaline tables: run `sagaline db upgrade`"
        )
    return store


def outbox_events(store_url: str, *, dead: bool = False, limit: int = 50) -> list[Any]:
    """Pending outbox rows (or dead letters), oldest first."""
    from .outbox.events import list_events

    store = _outbox_store(store_url)
    try:
        with store.engine.connect() as conn:
            return list_events(conn, dead=dead, limit=limit)
    finally:
        store.close()


def retry_outbox_events(store_url: str, event_ids: list[str] | None) -> int:
    """Make dead letters (those named, or every one) pending again."""
    from .outbox.events import retry_events

    store = _outbox_store(store_url)
    try:
        with store.engine.execution_options(sagaline_write=True).begin() as conn:
            return retry_events(conn, event_ids)
    finally:
        store.close()


def outbox_relay(store_url: str, routes: Any, *, app: Any = None, **options: Any) -> Any:
    """A relay (sagaline.outbox.relay.Relay) on the store's database; `run(stop)` it."""
    from .outbox.relay import Relay

    _outbox_store(store_url).close()
    return Relay(store_url, routes, app=app, **options)


def serve_outbox_metrics(port: int) -> Any:
    """Serve this process's Prometheus metrics (the outbox's) on `port`; returns the
    server (`shutdown()` stops it). Names the `prometheus` extra when it is missing."""
    from .outbox import metrics

    return metrics.serve(port)
