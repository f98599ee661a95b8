"""Retention for the surfaces: `sagaline.gc(...)` and `sagaline gc`; `ops` re-exports it.

What is deleted, and how, is the store's contract (`Store.gc`, stores/retention.py);
the sweeper applies the `retention` setting by itself (sweeper.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import timedelta

from . import signals
from .config import Settings, parse_duration
from .exceptions import ConfigurationError, InputError
from .runtime import Runtime, current_runtime
from .states import SagaStatus
from .stores.base import Store, open_existing
from .stores.retention import DEFAULT_GC_BATCH, DEFAULT_GC_STATUSES, MAX_GC_BATCH, GcReport

__all__ = ["DEFAULT_GC_BATCH", "MAX_GC_BATCH", "GcReport", "announce", "gc"]

log = logging.getLogger("sagaline")


def gc(
    older_than: str | float | timedelta,
    *,
    status: Iterable[SagaStatus | str] | None = None,
    name: str | None = None,
    dry_run: bool = False,
    batch_size: int = DEFAULT_GC_BATCH,
    store: str | Store | None = None,
    runtime: Runtime | None = None,
    now: float | None = None,
) -> GcReport:
    """Delete finished sagas that ended more than `older_than` ago, with their steps,
    history, index entries and idempotency keys (which become free again).

    `older_than`: seconds, a `timedelta`, or a duration such as ``"30d"`` or ``"12h"``.
    `status`: which finished sagas (default COMPLETED and COMPENSATED; FAILED ones wait
    for an operator, and are deleted only when named). `name`: only sagas of this name.
    A child saga is deleted with its parent, never alone while its parent exists, and
    a parent whose child saga still runs is kept. `dry_run`: count, delete nothing.
    `batch_size`: sagas per transaction. `store`: a URL or a Store (default: the
    runtime's store, else SAGALINE_STORE_URL); a URL names an existing store, never
    created. Returns a report of the sagas (per status), steps and events removed.
    """
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise InputError(f"gc older_than: {exc}") from None
    if age <= 0:
        raise InputError(f"gc older_than must be more than 0 s, got {older_than!r}")
    target, owned = _target(store, runtime)
    try:
        moment = now if now is not None else runtime.now() if runtime else time.time()
        report = target.gc(
            moment - age,
            statuses=DEFAULT_GC_STATUSES if status is None else status,
            name=name,
            dry_run=dry_run,
            batch_size=batch_size,
        )
    finally:
        if owned:
            target.close()
    if not dry_run:
        announce(report, sender=runtime or target)
    return report


def announce(report: GcReport, *, sender: object) -> None:
    """Log what retention deleted and send `signals.retention_deleted` (nothing: silence)."""
    if report.total == 0:
        return
    by_status = {s.value: n for s, n in sorted(report.sagas.items())}
    log.info(
        "retention: deleted %d saga(s) %s ended before %s, with %d step(s) and %d event(s)",
        report.total,
        by_status,
        time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(report.cutoff)),
        report.steps,
        report.events,
    )
    signals.retention_deleted.send(
        sender=sender, by_status=by_status, steps=report.steps, events=report.events
    )


def _target(store: str | Store | None, runtime: Runtime | None) -> tuple[Store, bool]:
    """The store to collect, and whether it was opened here (and is closed here)."""
    if isinstance(store, Store):
        return store, False
    if store is not None:
        return open_existing(store), True
    if runtime is not None:
        return runtime.store, False
    try:
        return current_runtime().store, False
    except ConfigurationError:
        return open_existing(Settings.from_env().store_url), True
