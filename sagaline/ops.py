"""Operations shared by every surface (Python API, CLI, REST, dashboard)."""

from __future__ import annotations

import inspect
import logging
import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

# The surfaces (cli, timeline, demo) reach the core only through this module: the
# `name as name` imports are what they need besides the operations, re-exported.
from . import recovery, sweeper
from ._state import registered_saga, registered_sagas
from .config import Settings
from .definition import short_name as short_name
from .engine import first_line as first_line
from .exceptions import (
    ConfigurationError,
    InvalidTransition,
    SagaError,
    SagaNotFound,
    StoreError,
)
from .forking import child_safe_lock
from .ops_gc import DEFAULT_GC_BATCH as DEFAULT_GC_BATCH
from .ops_gc import MAX_GC_BATCH as MAX_GC_BATCH
from .ops_gc import GcReport as GcReport
from .ops_gc import gc as gc
from .ops_outbox import outbox_events as outbox_events
from .ops_outbox import outbox_relay as outbox_relay
from .ops_outbox import retry_outbox_events as retry_outbox_events
from .ops_outbox import serve_outbox_metrics as serve_outbox_metrics
from .records import Decision, Event, SagaFilter, SagaRecord, SagaState
from .runtime import Runtime as Runtime
from .runtime import current_runtime as current_runtime
from .states import EventKind, SagaStatus
from .stores.base import Store as Store
from .stores.base import redact as redact
from .stores.registry import open_existing as open_existing
from .stores.registry import store_class as store_class
from .sweeper import SweepReport
from .views import Attempt as Attempt
from .views import SagaView as SagaView
from .views import compensation_failures as compensation_failures
from .views import cut_deep as cut_deep
from .views import event_as_dict as event_as_dict
from .views import failure_summary as failure_summary
from .views import parse_when as parse_when
from .views import step_attempts as step_attempts
from .views import summary_as_dict as summary_as_dict
from .views import view_as_dict as view_as_dict

log = logging.getLogger("sagaline")


# -- reading: any process, given a store ----------------------------------------------------


def open_store(url: str, *, read_only: bool = False, give_up_after: float | None = None) -> Store:
    """A store for a tool that reads or upgrades it, not for a worker.

    `read_only`: the store must exist already; it is neither created nor migrated.
    `give_up_after`: seconds to retry an unreachable server before StoreError, so that
    a command fails within seconds rather than after the store's default wait.
    """
    cls = store_class(url)
    options: dict[str, Any] = {}
    if give_up_after is not None:
        if "retry_for" in inspect.signature(cls).parameters:
            options["retry_for"] = give_up_after
        if url.startswith(("postgresql", "postgres", "mysql", "mariadb")):
            options["connect_args"] = {"connect_timeout": int(give_up_after) + 1}
    if read_only:
        return open_existing(url, **options)
    return cls(url, **options)  # type: ignore[call-arg]


# How many child sagas a saga's view lists.
MAX_CHILDREN = 500


def read_saga(
    store: Store, saga_id: str, *, with_history: bool = True, history_limit: int | None = None
) -> SagaView:
    """A saga with its steps and (unless not wanted) its history, or only its newest
    `history_limit` events; SagaNotFound if none."""
    state = store.read_state(saga_id)
    if state is None:
        raise SagaNotFound(saga_id)
    history = None
    if with_history:
        history = (
            store.history(saga_id)
            if history_limit is None
            else store.history_tail(saga_id, limit=history_limit)
        )
    view = SagaView.of(state, history)
    view.children = store.list_sagas(SagaFilter(parent_saga_id=saga_id, limit=MAX_CHILDREN))
    return view


def find_sagas(store: Store, flt: SagaFilter) -> list[SagaView]:
    """The sagas matching `flt`, newest first, as views without history.

    Only a FAILED saga's steps are read: its summary names the compensations that
    failed; the others' summary is their record's alone.
    """
    sagas = store.list_sagas(flt)
    steps = store.steps_of([s.saga_id for s in sagas if s.status is SagaStatus.FAILED])
    return [SagaView(saga, steps.get(saga.saga_id, [])) for saga in sagas]


_readers: dict[str, Store] = {}
_readers_lock = child_safe_lock()


def read_store(runtime: Runtime | None = None) -> Store:
    """The store to read: the runtime's, else the one `init_app` set up in this process,
    else (a process that only reads) the store of SAGALINE_STORE_URL or the embedded
    default, opened for reading only: a missing store is an error, never created."""
    if runtime is not None:
        return runtime.store
    try:
        return current_runtime().store
    except ConfigurationError:
        pass
    url = Settings.from_env().store_url
    key = f"{os.getpid()}:{url}"
    with _readers_lock:
        if key not in _readers:
            _readers[key] = open_existing(url)
        return _readers[key]


def get_saga(
    saga_id: str, *, runtime: Runtime | None = None, with_history: bool = True
) -> SagaView:
    """A saga with its steps and history, from any process (see `read_store`)."""
    return read_saga(read_store(runtime), saga_id, with_history=with_history)


def list_sagas(
    *,
    status: list[SagaStatus] | SagaStatus | None = None,
    name: str | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
    limit: int = 50,
    offset: int = 0,
    runtime: Runtime | None = None,
) -> list[SagaRecord]:
    """Sagas matching the filters, newest first, from any process (see `read_store`)."""
    statuses = [status] if isinstance(status, SagaStatus) else status
    return read_store(runtime).list_sagas(
        SagaFilter(
            status=statuses,
            name=name,
            created_after=created_after,
            created_before=created_before,
            limit=limit,
            offset=offset,
        )
    )


# -- actions: they publish, so they take the runtime of an app -----------------------------


def cancel(
    saga_id: str,
    *,
    reason: str = "cancelled by operator",
    runtime: Runtime | None = None,
    actor: str = "python",
) -> SagaRecord:
    """Stop a running saga and compensate what it applied.

    `actor` (who asked: a token's name, `cli`) is recorded in the saga's history.
    """
    rt = runtime or current_runtime()
    return _operate(
        rt,
        saga_id,
        "cancel",
        actor,
        lambda d, st: recovery.cancel(d, st, reason=reason, now=rt.now(), timing=rt.timing),
        reason=reason,
    )


def resume(saga_id: str, *, runtime: Runtime | None = None, actor: str = "python") -> SagaRecord:
    """Retry exactly the unfinished compensations (or forward steps) of a FAILED saga."""
    rt = runtime or current_runtime()
    return _operate(
        rt,
        saga_id,
        "resume",
        actor,
        lambda d, st: recovery.resume(d, st, now=rt.now(), timing=rt.timing),
    )


def _operate(
    rt: Runtime, saga_id: str, action: str, actor: str, decide: Any, **detail: Any
) -> SagaRecord:
    def audited(defn: Any, state: SagaState) -> Decision | None:
        decision: Decision | None = decide(defn, state)
        if decision is not None:
            # The audit entry commits with the action itself, or not at all.
            decision.events.append(
                Event(
                    saga_id,
                    AUDIT_EVENT,
                    rt.now(),
                    detail={"action": action, "actor": actor, **detail},
                )
            )
        return decision

    decision = rt.transact(saga_id, audited)
    saga = rt.store.get_saga(saga_id)
    if saga is None:
        raise SagaNotFound(saga_id)
    if decision is None:
        raise InvalidTransition(saga_id, saga.status.value, action)
    return saga


# The history event every operator action appends, naming who asked.
AUDIT_EVENT = EventKind.OPERATOR_ACTION
# How many sagas one bulk cancel acts on at most.
MAX_BULK = 10_000


def start(
    name: str,
    input: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    runtime: Runtime | None = None,
    actor: str = "python",
) -> tuple[SagaRecord, bool]:
    """Start saga `name` (defined in this process) with `input`: (its record, whether new).

    The same key with the same input returns the saga it started (False); with other
    input, IdempotencyConflict. An unknown name is a ConfigurationError.
    """
    rt = runtime or current_runtime()
    new_id = str(uuid.uuid4())
    handle = rt.start_saga(
        rt.definition(name), input, idempotency_key=idempotency_key, saga_id=new_id
    )
    created = handle.saga_id == new_id
    if created:
        rt.store.append_event(
            Event(new_id, AUDIT_EVENT, rt.now(), detail={"action": "start", "actor": actor})
        )
    return handle.record(), created


def saga_names() -> list[str]:
    """The names of the sagas this process can start."""
    return sorted(d.name for d in registered_sagas())


def cancel_matching(
    flt: SagaFilter,
    *,
    dry_run: bool = False,
    reason: str = "cancelled by operator",
    runtime: Runtime | None = None,
    actor: str = "python",
) -> tuple[list[str], list[str]]:
    """Cancel every RUNNING saga matching `flt` (at most MAX_BULK): (matched, cancelled).

    `dry_run` only counts. A saga that ends between the listing and its cancel is
    matched but not cancelled.
    """
    rt = runtime or current_runtime()
    statuses: list[SagaStatus] = (
        [SagaStatus.RUNNING]
        if flt.status is None
        else [s for s in flt.status if s is SagaStatus.RUNNING]
    )
    page = replace(flt, status=statuses, limit=500, offset=0)
    matched: list[str] = []
    while len(matched) < MAX_BULK:
        found = rt.store.list_sagas(page)
        matched += [s.saga_id for s in found][: MAX_BULK - len(matched)]
        if len(found) < page.limit:
            break
        page = replace(page, before=(found[-1].created_at, found[-1].saga_id))
    if dry_run:
        return matched, []
    cancelled = []
    for saga_id in matched:
        try:
            cancel(saga_id, reason=reason, runtime=rt, actor=actor)
        except InvalidTransition:
            continue
        cancelled.append(saga_id)
    return matched, cancelled


def step_shapes(runtime: Runtime | None, saga: SagaRecord) -> dict[str, StepShape]:
    """What the definition says of each step (empty: no definition in this process)."""
    defn = None if runtime is None else registered_saga(saga.name)
    if defn is None or defn.fingerprint != saga.fingerprint:
        return {}
    return {
        s.name: StepShape(
            list(s.depends_on),
            s.retry.max_attempts,
            s.compensation_retry.max_attempts,
            s.compensable,
            s.pivot,
        )
        for s in defn.steps
    }


@dataclass(slots=True)
class StepShape:
    """A step as its saga's definition has it: where it sits and how often it may run."""

    depends_on: list[str]
    max_attempts: int
    compensation_max_attempts: int
    compensable: bool
    pivot: bool


def migrate(
    store_url: str | None = None,
    *,
    runtime: Runtime | None = None,
    give_up_after: float | None = None,
) -> None:
    """Create or upgrade the store's schema (stores migrate on first use anyway).

    With `store_url`, that store (see `open_store` for `give_up_after`); otherwise the
    store of the current runtime. A failure is a StoreError naming the store.
    """
    if store_url is None:
        (runtime or current_runtime()).store.migrate()
        return
    store = open_store(store_url, give_up_after=give_up_after)
    try:
        store.migrate()
    except SagaError:
        raise
    except Exception as exc:
        # A driver's or migration tool's own error: say which store, in one line.
        raise StoreError(f"store {redact(store_url)} failed: {first_line(str(exc))}") from exc
    finally:
        store.close()


def sweep(runtime: Runtime | None = None, *, now: float | None = None, limit: int = 200) -> int:
    """Repair what crashes left behind; returns how many items it acted on."""
    return sweep_report(runtime, now=now, limit=limit).acted


def sweep_report(
    runtime: Runtime | None = None, *, now: float | None = None, limit: int = 200
) -> SweepReport:
    """One sweeper pass (see `sweeper.sweep`): each item it acted on, by kind."""
    return sweeper.sweep(runtime or current_runtime(), now=now, limit=limit)


# -- metrics of a process that is not a worker (the web server) ----------------------------


class MetricsExposition:
    """Prometheus text for a server that serves sagas but runs none: the counters of this
    process (sagas it started) and the saga gauges read from `store` (cached a few
    seconds, as a worker's are). Needs the `prometheus` extra."""

    def __init__(self, store: Store) -> None:
        from .observability import metrics

        self._pc = metrics._prometheus()
        metrics.current()  # this process's counters, in the default registry
        for signal, receiver in metrics._RECEIVERS:
            signal.connect(receiver, weak=False, dispatch_uid=f"sagaline.metrics.{signal.name}")
        self._gauges = self._pc.CollectorRegistry()
        self._gauges.register(metrics.StoreGauges(lambda: store))
        self.content_type: str = self._pc.CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return bytes(
            self._pc.generate_latest(self._pc.REGISTRY) + self._pc.generate_latest(self._gauges)
        )
