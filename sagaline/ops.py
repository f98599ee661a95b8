"""Operations shared by every surface (Python API, CLI, REST, dashboard)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

# The surfaces (cli, timeline, demo) reach the core only through this module: the
# `name as name` imports are what they need besides the operations, re-exported.
from . import engine, recovery
from .config import Settings
from .definition import Saga
from .definition import short_name as short_name
from .engine import Timing
from .engine import first_line as first_line
from .exceptions import ConfigurationError, InvalidTransition, SagaNotFound
from .records import Decision, Event, Owner, SagaFilter, SagaRecord, SagaState, StepRecord
from .runtime import Runtime as Runtime
from .runtime import current_runtime
from .states import CompensationStatus, Phase, SagaStatus, StepStatus
from .stores.base import Store as Store
from .stores.base import open_existing as open_existing
from .stores.base import redact as redact
from .stores.base import store_class as store_class

log = logging.getLogger("sagaline")


@dataclass
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
    store = read_store(runtime)
    saga = store.get_saga(saga_id)
    if saga is None:
        raise SagaNotFound(saga_id)
    return SagaView(saga, store.get_steps(saga_id),
                    store.history(saga_id) if with_history else [])


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


def migrate(store_url: str | None = None, *, runtime: Runtime | None = None) -> None:
    """Create or upgrade the store's schema (stores migrate on first use anyway).

    With `store_url`, that store; otherwise the store of the current runtime.
    """
    if store_url is None:
        (runtime or current_runtime()).store.migrate()
        return
    from .stores import store_from_url

    store = store_from_url(store_url, auto_migrate=False)
    try:
        store.migrate()
    finally:
        store.close()


def repair(defn: Saga, state: SagaState, step: str | None, now: float, timing: Timing,
           child_step: list[str]) -> Decision | None:
    """The sweeper's decision for one due item (None: nothing to do)."""
    if step is None:
        return recovery.deadline_or_grace_due(defn, state, now=now, timing=timing)
    rec = state.steps.get(step)
    if rec is None:
        return None
    running = rec.status is StepStatus.RUNNING or rec.comp_status is CompensationStatus.RUNNING
    if running and defn.graph.steps[step].child is not None:
        child_step.append(step)  # a child saga runs it: no lease to expire
        return None
    if running:
        return recovery.lease_expired(defn, state, step, now=now, timing=timing)
    return recovery.redispatch(defn, state, step, now=now, timing=timing)


def sweep(runtime: Runtime | None = None, *, now: float | None = None,
          limit: int = 200) -> int:
    """Repair what crashes left behind; returns how many items it acted on.

    Re-publishes DISPATCHED messages that may be lost, fails attempts whose
    lease expired, and rolls back sagas past their deadline or grace period.
    """
    rt = runtime or current_runtime()
    moment = time.time() if now is None else now
    acted = 0
    for item in rt.store.find_due(moment, limit=limit):
        child_step: list[str] = []

        def decide(state: SagaState, step: str | None = item.step,
                   child_step: list[str] = child_step) -> Decision | None:
            t = time.time() if now is None else now
            defn = rt.definition_for(state.saga)
            decision = None if defn is None else repair(defn, state, step, t, rt.timing,
                                                        child_step)
            if decision is None and not child_step:
                return recovery.snooze(state, step, now=t, timing=rt.timing)
            return decision

        try:
            decision = rt.store.transact(item.saga_id, decide)
            if child_step:
                rt.drive_child(item.saga_id, child_step[0])
                acted += 1
                continue
        except Exception:
            log.exception("sweeper: could not repair saga %s", item.saga_id)
            continue
        if decision is not None and decision.changed:
            rt.after_commit(decision)
            acted += 1
    return acted


def hand_back_lost_claims(runtime: Runtime, node: str, boot: str,
                          alive: Callable[[Collection[int]], Collection[int]], *,
                          earlier_boots: bool, stopping: bool = False,
                          limit: int = 200) -> int:
    """In a worker's main process: end at once the attempts its dead processes were running.

    A claim of worker `node` is lost when it was made by an earlier boot of that node
    (only with `earlier_boots`: the worker just started under the name of one that
    died), or by a process of this boot that `alive` (given the owners' pids, read
    after the claims) does not report alive. Each is a crashed attempt, as if its
    lease had expired; its retry goes to this worker's own queue unless the worker is
    `stopping`. Returns how many attempts were handed back.
    """
    queue = None if stopping else runtime.worker_queue
    claims = runtime.store.find_claimed(node, limit=limit)
    # The processes are looked at after the claims were read: a process that claimed
    # a step is listed by then, so a claim this young is never taken for a dead one.
    living = set(alive({c.owner_pid for c in claims if c.owner_pid is not None}))
    acted = 0
    for rec in claims:
        owner, phase = rec.owner, rec.running_phase
        if owner is None or phase is None:
            continue
        if owner.boot != boot:
            if not earlier_boots:
                continue
            cause = (f"worker {node} restarted; the process that ran this attempt "
                     f"(pid {owner.pid}) belonged to its previous start")
        elif owner.pid in living:
            continue
        else:
            cause = f"process {owner.pid} of worker {node} exited while running it"
        if _hand_back(runtime, rec.saga_id, rec.name, phase, rec.attempt_for(phase), owner,
                      cause, queue):
            acted += 1
    return acted


def _hand_back(rt: Runtime, saga_id: str, step: str, phase: Phase, attempt: int,
               owner: Owner, cause: str, queue: str | None) -> bool:
    def decide(state: SagaState) -> Decision | None:
        defn = rt.definition_for(state.saga)
        return None if defn is None else recovery.claim_lost(
            defn, state, step, phase, attempt, owner, cause=cause, now=time.time(),
            timing=rt.timing)

    try:
        decision = rt.store.transact(saga_id, decide)
        if decision is None:
            return False
        if queue is not None:
            # The retry (or, in a saga rolling back, the step's compensation) goes to this
            # worker's own queue: in the shared queue it would wait behind the whole
            # backlog. This worker was running the step, so it consumes its queue; should
            # it die first, the sweeper publishes it again to the step's queue after
            # redispatch_after.
            decision.dispatches = [
                replace(d, queue=queue)
                if d.step == step and d.child_saga is None else d
                for d in decision.dispatches]
        rt.after_commit(decision)
    except Exception:
        log.exception("could not hand back saga %s step %s (%s attempt %s)", saga_id, step,
                      phase, attempt)
        return False
    log.warning("saga %s step %s (%s attempt %s): %s; running it again", saga_id, step,
                phase, attempt, cause)
    return True


# -- reading a saga's history (CLI `show`, the dashboard's timeline, audits) ---------------

# The events that end one attempt of a step (forward) or of its compensation.
_ATTEMPT_ENDS = {
    "step_succeeded": "succeeded",
    "step_attempt_failed": "failed",
    "step_failed": "failed",
    "step_abandoned": "abandoned",
    "compensation_succeeded": "succeeded",
    "compensation_attempt_failed": "failed",
    "compensation_failed": "failed",
}
_ATTEMPT_STARTS = {"step_started", "compensation_started"}


@dataclass
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
            att.error = engine.first_line(error) if error else None
    return sorted(attempts.values(), key=lambda a: (a.started_at or a.finished_at or 0.0))


def compensation_failures(steps: list[StepRecord]) -> dict[str, str]:
    """The steps whose compensation failed for good, with the first line of its error."""
    return {s.name: engine.first_line(s.comp_error) or "no error recorded" for s in steps
            if s.comp_status is CompensationStatus.COMPENSATION_FAILED}


def failure_summary(saga: SagaRecord, steps: list[StepRecord]) -> str | None:
    """One line saying why a saga did not complete: its cause and, for a FAILED saga,
    which compensations failed and why (the cause alone hides that steps stay applied)."""
    if saga.status is SagaStatus.COMPLETED or (not saga.error and
                                               saga.status is not SagaStatus.FAILED):
        return None
    parts = [engine.first_line(saga.error)] if saga.error else []
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
