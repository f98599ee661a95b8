"""The sweeper: its pass (repair what crashes left behind) and the worker bootstep that runs it.

The bootstep's thread also hands back the claims of dead processes (lost_claims.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from celery import bootsteps
from celery.utils.nodenames import worker_direct

from . import recovery, signals
from .context import SagaLogFields, about_saga
from .definition import Saga
from .engine import Timing
from .forking import fork_guard
from .lost_claims import hand_back_dead_processes as hand_back_dead_processes
from .lost_claims import hand_back_lost_claims, pool_pids
from .ops_gc import announce
from .prefetched import requeue_prefetched_steps
from .records import Decision, SagaState
from .runtime import Runtime, current_runtime
from .stores.base import DueItem
from .stores.retention import DEFAULT_GC_BATCH, GcReport

log = logging.getLogger("sagaline")


class RepairKind(str, Enum):
    """What the sweeper did with one due item."""

    REDISPATCHED = "redispatched"  # a DISPATCHED step's message, maybe lost, published again
    LEASE_EXPIRED = "lease_expired"  # a running attempt whose lease ran out, failed
    DEADLINE = "deadline"  # a saga past its deadline or grace period, rolled back
    CHILD_DRIVEN = "child_driven"  # a step run by a child saga: the child was driven on
    POSTPONED = "postponed"  # nothing to do now: its due time pushed back


@dataclass(frozen=True)
class Repair:
    """The sweeper's decision for one due item; no decision for a child-saga step."""

    kind: RepairKind
    decision: Decision | None = None


@dataclass(frozen=True)
class Repaired:
    """One due item the sweeper acted on."""

    saga_id: str
    step: str | None
    kind: RepairKind
    due_at: float


@dataclass
class SweepReport:
    """What one sweeper pass found due and what it did with each item."""

    due: int = 0
    repaired: list[Repaired] = field(default_factory=list)
    failed: list[DueItem] = field(default_factory=list)  # logged; retried at the next pass

    @property
    def acted(self) -> int:
        """How many items the pass acted on (postponed ones included)."""
        return len(self.repaired)

    def by_kind(self) -> dict[RepairKind, int]:
        counts: dict[RepairKind, int] = {}
        for item in self.repaired:
            counts[item.kind] = counts.get(item.kind, 0) + 1
        return counts


def repair(
    defn: Saga, state: SagaState, step: str | None, now: float, timing: Timing
) -> Repair | None:
    """The sweeper's decision for one due item (None: nothing to do)."""
    if step is None:
        decision = recovery.deadline_or_grace_due(defn, state, now=now, timing=timing)
        return None if decision is None else Repair(RepairKind.DEADLINE, decision)
    rec = state.steps.get(step)
    if rec is None:
        return None
    running = rec.running_phase is not None
    if running and defn.graph.steps[step].child is not None:
        return Repair(RepairKind.CHILD_DRIVEN)  # a child saga runs it: no lease to expire
    if running:
        decision = recovery.lease_expired(defn, state, step, now=now, timing=timing)
        return None if decision is None else Repair(RepairKind.LEASE_EXPIRED, decision)
    decision = recovery.redispatch(defn, state, step, now=now, timing=timing)
    return None if decision is None else Repair(RepairKind.REDISPATCHED, decision)


def sweep(runtime: Runtime, *, now: float | None = None, limit: int = 200) -> SweepReport:
    """One pass: repair what crashes left behind, and report each item acted on.

    Re-publishes DISPATCHED messages that may be lost, fails attempts whose
    lease expired, and rolls back sagas past their deadline or grace period.
    """
    moment = runtime.now() if now is None else now
    report = SweepReport()
    for item in runtime.store.find_due(moment, limit=limit):
        report.due += 1
        # What is logged while repairing it (here, publishing, tracing) names the saga.
        with about_saga(item.saga_id, step=item.step) as about:
            _repair_one(runtime, item, now, report, about)
    signals.sweeper_repaired.send(sender=runtime, counts=report.by_kind())
    return report


def _repair_one(
    runtime: Runtime,
    item: DueItem,
    now: float | None,
    report: SweepReport,
    about: SagaLogFields,
) -> None:
    try:
        chosen, decision = _decide(runtime, item, now, about)
        if chosen is not None and chosen.kind is RepairKind.CHILD_DRIVEN:
            assert item.step is not None  # only a step is run by a child saga
            runtime.drive_child(item.saga_id, item.step)
            report.repaired.append(Repaired(item.saga_id, item.step, chosen.kind, item.due_at))
            return
    except Exception:
        log.exception("sweeper: could not repair saga %s", item.saga_id)
        report.failed.append(item)
        return
    if chosen is not None and decision is not None and decision.changed:
        runtime.after_commit(decision)
        report.repaired.append(Repaired(item.saga_id, item.step, chosen.kind, item.due_at))


def _decide(
    rt: Runtime, item: DueItem, now: float | None, about: SagaLogFields
) -> tuple[Repair | None, Decision | None]:
    """Commit the repair of one item; what was chosen, and the decision committed."""
    chosen: Repair | None = None

    def decide(state: SagaState) -> Decision | None:
        nonlocal chosen  # the store may call decide again (a conflict): the last one counts
        about.saga_name = state.saga.name
        rec = state.steps.get(item.step) if item.step is not None else None
        if rec is not None and rec.running_phase is not None:
            about.phase = rec.running_phase.value
            about.attempt = rec.attempt_for(rec.running_phase)
        t = rt.now() if now is None else now
        defn = rt.definition_for(state.saga)
        chosen = None if defn is None else repair(defn, state, item.step, t, rt.timing)
        if chosen is None:
            # An item left due would stay first among the due items and, in numbers,
            # keep the sweeper from ever reaching the others.
            later = recovery.snooze(state, item.step, now=t, timing=rt.timing)
            chosen = None if later is None else Repair(RepairKind.POSTPONED, later)
        return None if chosen is None else chosen.decision

    decision = rt.store.transact(item.saga_id, decide)
    return chosen, decision


# Seconds between the sweeper's looks for expired sagas when it found no backlog.
RETENTION_IDLE = 60.0


class RetentionPass:
    """The sweeper's share of retention (the `retention` setting): one gc batch at most
    per sweep, after the repairs, so that deleting history never delays them.

    While batches come back full there is a backlog, and every sweep deletes one more;
    otherwise the next look is RETENTION_IDLE seconds later (sooner for a retention
    shorter than ten times that). Every worker's sweeper may run it: each batch is
    re-checked where it is deleted, and SQL skips the rows another sweeper holds.
    """

    def __init__(self) -> None:
        self._next = 0.0
        # Where the backlog's next batch starts: sagas kept (a child still running)
        # are passed over rather than read again at every sweep.
        self._cursor: str | None = None

    def run(self, runtime: Runtime) -> GcReport | None:
        retention = runtime.settings.retention
        now = time.monotonic()
        if retention <= 0 or now < self._next:
            return None
        report = runtime.store.gc(
            runtime.now() - retention,
            batch_size=DEFAULT_GC_BATCH,
            max_batches=1,
            after=self._cursor,
        )
        self._cursor = report.cursor
        self._next = now if report.more else now + min(RETENTION_IDLE, retention / 10)
        announce(report, sender=runtime)
        return report


# -- the bootstep -------------------------------------------------------------------------


class SweeperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs `sweep()` every `sweep_interval` seconds in a thread of the worker's main process.

    Safe in every worker at once: each repair is a locked compare-and-set that
    re-checks the due time, so two sweepers never both act on the same item.

    The same thread hands back the claims of this worker's dead processes: at start,
    those of an earlier boot of this node name (they died with it); then, at every
    pass and as soon as a pool process is lost, those whose process has left the pool.
    Node names must be unique among running workers (Celery's own rule): a worker
    started under the name of one still running would take over its claims.
    """

    label = "sagaline sweeper"

    def __init__(self, worker: Any, **kwargs: Any):
        self._retention = RetentionPass()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        super().__init__(worker, **kwargs)
        # Consume Celery's worker-direct queue (what `worker_direct=True` does): the
        # retries of the steps this worker hands back go there, not behind the backlog.
        direct = worker_direct(worker.hostname)
        if direct.name not in worker.app.amqp.queues.consume_from:
            worker.app.amqp.queues.select_add(direct)
        with contextlib.suppress(Exception):
            current_runtime(worker.app).worker_queue = direct.name

    def start(self, worker: Any) -> None:
        runtime = current_runtime(worker.app)
        # Import the store's driver here, in the main thread, rather than in the thread
        # while the pool may be forking: a child forked mid-import would hang.
        runtime.store  # noqa: B018
        self._started = time.time()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(runtime, worker), name="sagaline-sweeper", daemon=True
        )
        self._thread.start()

    def _loop(self, runtime: Runtime, worker: Any) -> None:
        interval = runtime.settings.sweep_interval
        earlier_boots = True  # until one pass has looked at them
        for_a_sweep = interval
        try:
            with fork_guard():
                requeue_prefetched_steps(worker.app, delivered_before=self._started)
        except Exception:
            log.exception(
                "could not put back the step messages of stopped workers; the "
                "sweeper publishes them again after redispatch_after"
            )
        while not self._stop.is_set():
            runtime.process_lost.clear()
            with fork_guard():
                if self._hand_back_lost(runtime, worker, earlier_boots=earlier_boots):
                    earlier_boots = False
            if for_a_sweep <= 0:
                for_a_sweep = interval
                try:
                    with fork_guard():
                        sweep(runtime)
                except Exception:
                    log.exception("sweeper pass failed; trying again in %ss", interval)
                try:
                    with fork_guard():
                        self._retention.run(runtime)
                except Exception:
                    log.exception("retention: could not delete old sagas; trying again later")
            waited = _wait_either(runtime.process_lost, self._stop, for_a_sweep)
            for_a_sweep -= waited

    def _hand_back_lost(self, runtime: Runtime, worker: Any, *, earlier_boots: bool) -> bool:
        node, boot = runtime.worker_node, runtime.worker_boot
        if node is None or boot is None:
            return True
        try:
            # Pages of claims: at start, an earlier boot may have left more than one.
            for _ in range(50):
                acted = hand_back_lost_claims(
                    runtime,
                    node,
                    boot,
                    lambda pids: pool_pids(getattr(worker, "pool", None)),
                    earlier_boots=earlier_boots,
                )
                if acted == 0:
                    break
            return True
        except Exception:
            log.exception(
                "could not look for the claims of dead processes; trying again in %ss",
                runtime.settings.sweep_interval,
            )
            return False

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # A cold shutdown has stopped the pool by now, cutting its tasks short.
        hand_back_dead_processes(current_runtime(worker.app))

    # Without it, StartStopStep.terminate (a cold shutdown) would not stop the thread.
    terminate = stop
    shutdown = stop


def _wait_either(event: threading.Event, stop: threading.Event, timeout: float) -> float:
    """Wait up to `timeout` s for either event, in short slices; the seconds waited."""
    started = time.monotonic()
    while not event.is_set() and not stop.is_set():
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            break
        event.wait(min(left, 0.2))
    return time.monotonic() - started
