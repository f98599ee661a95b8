"""Operations shared by every surface (Python API, CLI, REST, dashboard)."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

# The surfaces (cli, timeline, demo) reach the core only through this module: the
# `name as name` imports are what they need besides the operations, re-exported.
from . import recovery, sweeper
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
from .records import Event, SagaFilter, SagaRecord, SagaState, StepRecord
from .runtime import Runtime as Runtime
from .runtime import current_runtime
from .states import CompensationStatus, EventKind, SagaStatus
from .stores.base import Store as Store
from .stores.base import open_existing as open_existing
from .stores.base import redact as redact
from .stores.base import store_class as store_class
from .sweeper import SweepReport

log = logging.getLogger("sagaline")


@dataclass(slots=True)
class SagaView:
    """A saga as any process can read it: the record, its steps and its history."""

    saga: SagaRecord
    steps: list[StepRecord]
    history: list[Event] = field(default_factory=list)

    @property
    def saga_id(self) -> str:
        return self.saga.saga_id

    @property
    def name(self) -> str:
        return self.saga.name

    @property
    def status(self) -> SagaStatus:
        return self.saga.status

    @property
    def output(self) -> Any:
        return self.saga.output

    @property
    def error(self) -> str | None:
        return self.saga.error

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def of(cls, state: SagaState, history: list[Event] | None = None) -> SagaView:
        """The view of a saga's state (`Store.read_state`), with its history if read."""
        return cls(state.saga, list(state.steps.values()), history or [])


# -- reading: any process, given a store ----------------------------------------------------


def open_store(url: str, *, read_only: bool = False,
               give_up_after: float | None = None) -> Store:
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


def read_saga(store: Store, saga_id: str, *, with_history: bool = True) -> SagaView:
    """A saga with its steps and (unless not wanted) its history; SagaNotFound if none."""
    state = store.read_state(saga_id)
    if state is None:
        raise SagaNotFound(saga_id)
    return SagaView.of(state, store.history(saga_id) if with_history else None)


def find_sagas(store: Store, flt: SagaFilter) -> list[SagaView]:
    """The sagas matching `flt`, newest first, as views without history.

    Only a FAILED saga's steps are read: its summary names the compensations that
    failed; the others' summary is their record's alone.
    """
    views = []
    for saga in store.list_sagas(flt):
        state = store.read_state(saga.saga_id) if saga.status is SagaStatus.FAILED else None
        views.append(SagaView(saga, [] if state is None else list(state.steps.values())))
    return views


_readers: dict[str, Store] = {}
_readers_lock = threading.Lock()


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


def get_saga(saga_id: str, *, runtime: Runtime | None = None,
             with_history: bool = True) -> SagaView:
    """A saga with its steps and history, from any process (see `read_store`)."""
    return read_saga(read_store(runtime), saga_id, with_history=with_history)


def list_sagas(*, status: list[SagaStatus] | SagaStatus | None = None, name: str | None = None,
               created_after: float | None = None, created_before: float | None = None,
               limit: int = 50, offset: int = 0,
               runtime: Runtime | None = None) -> list[SagaRecord]:
    """Sagas matching the filters, newest first, from any process (see `read_store`)."""
    statuses = [status] if isinstance(status, SagaStatus) else status
    return read_store(runtime).list_sagas(SagaFilter(status=statuses, name=name,
                                          created_after=created_after,
                                          created_before=created_before, limit=limit,
                                          offset=offset))


# -- actions: they publish, so they take the runtime of an app -----------------------------


def cancel(saga_id: str, *, reason: str = "cancelled by operator",
           runtime: Runtime | None = None) -> SagaRecord:
    """Stop a running saga and compensate what it applied."""
    rt = runtime or current_runtime()
    return _operate(rt, saga_id, "cancel", lambda d, st: recovery.cancel(
        d, st, reason=reason, now=time.time(), timing=rt.timing))


def resume(saga_id: str, *, runtime: Runtime | None = None) -> SagaRecord:
    """Retry exactly the unfinished compensations (or forward steps) of a FAILED saga."""
    rt = runtime or current_runtime()
    return _operate(rt, saga_id, "resume", lambda d, st: recovery.resume(
        d, st, now=time.time(), timing=rt.timing))


def _operate(rt: Runtime, saga_id: str, action: str, decide: Any) -> SagaRecord:
    decision = rt.transact(saga_id, decide)
    saga = rt.store.get_saga(saga_id)
    if saga is None:
        raise SagaNotFound(saga_id)
    if decision is None:
        raise InvalidTransition(saga_id, saga.status.value, action)
    return saga


def migrate(store_url: str | None = None, *, runtime: Runtime | None = None,
            give_up_after: float | None = None) -> None:
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
        raise StoreError(f"store {redact(store_url)} failed: {first_line(str(exc))}") \
            from exc
    finally:
        store.close()


def sweep(runtime: Runtime | None = None, *, now: float | None = None,
          limit: int = 200) -> int:
    """Repair what crashes left behind; returns how many items it acted on."""
    return sweep_report(runtime, now=now, limit=limit).acted


def sweep_report(runtime: Runtime | None = None, *, now: float | None = None,
                 limit: int = 200) -> SweepReport:
    """One sweeper pass (see `sweeper.sweep`): each item it acted on, by kind."""
    return sweeper.sweep(runtime or current_runtime(), now=now, limit=limit)


# -- reading a saga's history (CLI `show`, the dashboard's timeline, audits) ---------------

# The events that end one attempt of a step (forward) or of its compensation.
_ATTEMPT_ENDS: dict[EventKind | str, str] = {
    EventKind.STEP_SUCCEEDED: "succeeded",
    EventKind.STEP_ATTEMPT_FAILED: "failed",
    EventKind.STEP_FAILED: "failed",
    EventKind.STEP_ABANDONED: "abandoned",
    EventKind.COMPENSATION_SUCCEEDED: "succeeded",
    EventKind.COMPENSATION_ATTEMPT_FAILED: "failed",
    EventKind.COMPENSATION_FAILED: "failed",
}
_ATTEMPT_STARTS = {EventKind.STEP_STARTED, EventKind.COMPENSATION_STARTED}


@dataclass(slots=True)
class Attempt:
    """One run of a step body or of its compensation, as the history recorded it."""

    step: str
    phase: str
    attempt: int
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str = "running"  # running | succeeded | failed | abandoned
    error: str | None = None  # the first line of the error

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def step_attempts(history: list[Event]) -> list[Attempt]:
    """Every attempt of every step and compensation, in the order they started."""
    attempts: dict[tuple[str, str, int], Attempt] = {}
    for ev in history:
        if ev.step is None or ev.attempt is None or ev.phase is None:
            continue
        if ev.kind not in _ATTEMPT_STARTS and ev.kind not in _ATTEMPT_ENDS:
            continue
        key = (ev.step, ev.phase, ev.attempt)
        att = attempts.setdefault(key, Attempt(ev.step, ev.phase, ev.attempt))
        if ev.kind in _ATTEMPT_STARTS:
            att.started_at = ev.ts
        else:
            att.finished_at = ev.ts
            att.outcome = _ATTEMPT_ENDS[ev.kind]
            error = ev.detail.get("error")
            att.error = first_line(error) if error else None
    return sorted(attempts.values(), key=lambda a: (a.started_at or a.finished_at or 0.0))


def compensation_failures(steps: list[StepRecord]) -> dict[str, str]:
    """The steps whose compensation failed for good, with the first line of its error."""
    return {s.name: first_line(s.comp_error) or "no error recorded" for s in steps
            if s.comp_status is CompensationStatus.COMPENSATION_FAILED}


def failure_summary(saga: SagaRecord, steps: list[StepRecord]) -> str | None:
    """One line saying why a saga did not complete: its cause and, for a FAILED saga,
    which compensations failed and why (the cause alone hides that steps stay applied)."""
    if saga.status is SagaStatus.COMPLETED or (not saga.error and
                                               saga.status is not SagaStatus.FAILED):
        return None
    parts = [first_line(saga.error)] if saga.error else []
    if saga.status is SagaStatus.FAILED:
        parts += [f"compensation of {name!r} failed: {error}"
                  for name, error in compensation_failures(steps).items()]
    return "; ".join(parts) or None


def view_as_dict(view: SagaView) -> dict[str, Any]:
    """A saga with its steps, attempts and history as plain JSON-ready data.

    Records are converted one level deep only: stored values (input, outputs) are
    JSON already, and copying them recursively fails on deeply nested values.
    """
    return {
        "saga": _plain(view.saga),
        "summary": failure_summary(view.saga, view.steps),
        "compensation_failures": compensation_failures(view.steps),
        "steps": [_plain(s) for s in view.steps],
        "attempts": [{**_plain(a), "duration": a.duration}
                     for a in step_attempts(view.history)],
        "history": [_plain(e) for e in view.history],
    }


def _plain(record: Any) -> dict[str, Any]:
    return {f.name: _enum_value(getattr(record, f.name)) for f in fields(record)}


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


# -- the transactional outbox (sagaline/outbox/) ---------------------------------------

def _outbox_store(store_url: str) -> Any:
    from .stores.sql import SQLStore

    if store_class(store_url) is not SQLStore:
        raise ConfigurationError(f"the outbox lives in a SQL database; "
                                 f"{redact(store_url)} is not one")
    store = SQLStore(store_url, auto_migrate=False)
    if not store.exists():
        store.close()
        raise ConfigurationError(f"{redact(store_url)} has no sagaline tables: run "
                                 f"`sagaline db upgrade`")
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
