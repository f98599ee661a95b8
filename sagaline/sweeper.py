"""The sweeper: its pass (repair what crashes left behind) and the worker bootstep that runs it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from celery import bootsteps
from celery.utils.nodenames import worker_direct

from . import recovery
from .definition import Saga
from .engine import Timing
from .forking import fork_guard
from .prefetched import requeue_prefetched_steps
from .records import Decision, Owner, SagaState
from .runtime import Runtime, current_runtime
from .states import Phase
from .stores.base import DueItem

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


def repair(defn: Saga, state: SagaState, step: str | None, now: float,
           timing: Timing) -> Repair | None:
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
    moment = time.time() if now is None else now
    report = SweepReport()
    for item in runtime.store.find_due(moment, limit=limit):
        report.due += 1
        try:
            chosen, decision = _decide(runtime, item, now)
            if chosen is not None and chosen.kind is RepairKind.CHILD_DRIVEN:
                assert item.step is not None  # only a step is run by a child saga
                runtime.drive_child(item.saga_id, item.step)
                report.repaired.append(Repaired(item.saga_id, item.step, chosen.kind,
                                                item.due_at))
                continue
        except Exception:
            log.exception("sweeper: could not repair saga %s", item.saga_id)
            report.failed.append(item)
            continue
        if chosen is not None and decision is not None and decision.changed:
            runtime.after_commit(decision)
            report.repaired.append(Repaired(item.saga_id, item.step, chosen.kind, item.due_at))
    return report


def _decide(rt: Runtime, item: DueItem, now: float | None) -> tuple[Repair | None,
                                                                     Decision | None]:
    """Commit the repair of one item; what was chosen, and the decision committed."""
    chosen: Repair | None = None

    def decide(state: SagaState) -> Decision | None:
        nonlocal chosen  # the store may call decide again (a conflict): the last one counts
        t = time.time() if now is None else now
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


# -- handing back the claims of dead processes ------------------------------------------


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
        else:
            # A stopping worker: a retry's backoff would wait in this process
            # (DelayedPublisher), which is about to exit, and the step would then wait
            # for the sweeper. Publish now; the claim fences by attempt, not by time.
            decision.dispatches = [replace(d, countdown=0.0) for d in decision.dispatches]
        rt.after_commit(decision)
    except Exception:
        log.exception("could not hand back saga %s step %s (%s attempt %s)", saga_id, step,
                      phase, attempt)
        return False
    log.warning("saga %s step %s (%s attempt %s): %s; running it again", saga_id, step,
                phase, attempt, cause)
    return True


def hand_back_dead_processes(runtime: Runtime) -> None:
    """Hand back the claims of this boot whose process no longer exists."""
    if runtime.worker_node is None or runtime.worker_boot is None:
        return
    try:
        hand_back_lost_claims(runtime, runtime.worker_node, runtime.worker_boot,
                              _existing, earlier_boots=False, stopping=True)
    except Exception:
        log.exception("could not hand back the claims of exited processes")


def _existing(pids: Collection[int]) -> set[int]:
    """The pids that name a live process, and this one (it runs the solo/threads pool)."""
    found = {os.getpid()}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # it exists, under another user
        found.add(pid)
    return found


def pool_pids(pool: Any) -> set[int]:
    """The live processes that run this worker's tasks: the prefork pool's children
    (billiard drops a child from this list once it has reaped it), else this process."""
    # The same attribute that Celery's own prefork TaskPool._get_info reads.
    procs = getattr(getattr(pool, "_pool", None), "_pool", None)
    found = {os.getpid()}
    if isinstance(procs, list):
        found.update(p.pid for p in list(procs) if p.pid is not None)
    return found


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
        self._thread = threading.Thread(target=self._loop, args=(runtime, worker),
                                        name="sagaline-sweeper", daemon=True)
        self._thread.start()

    def _loop(self, runtime: Runtime, worker: Any) -> None:
        interval = runtime.settings.sweep_interval
        earlier_boots = True  # until one pass has looked at them
        for_a_sweep = interval
        try:
            with fork_guard():
                requeue_prefetched_steps(worker.app, delivered_before=self._started)
        except Exception:
            log.exception("could not put back the step messages of stopped workers; the "
                          "sweeper publishes them again after redispatch_after")
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
                    runtime, node, boot,
                    lambda pids: pool_pids(getattr(worker, "pool", None)),
                    earlier_boots=earlier_boots)
                if acted == 0:
                    break
            return True
        except Exception:
            log.exception("could not look for the claims of dead processes; trying again "
                          "in %ss", runtime.settings.sweep_interval)
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
