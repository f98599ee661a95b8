"""Handing back the claims of dead worker processes: each is a crashed attempt, retried at once.

A worker's main process runs this (from the sweeper's thread, and when it stops):
a claim of its node made by a process that no longer exists, or by an earlier
start of the node, is ended as if its lease had expired, without waiting for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from . import recovery, signals
from .context import SagaLogFields, about_saga
from .records import Decision, Owner, SagaState
from .runtime import Runtime
from .states import Phase

log = logging.getLogger("sagaline")


def hand_back_lost_claims(
    runtime: Runtime,
    node: str,
    boot: str,
    alive: Callable[[Collection[int]], Collection[int]],
    *,
    earlier_boots: bool,
    stopping: bool = False,
    limit: int = 200,
) -> int:
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
            cause = (
                f"worker {node} restarted; the process that ran this attempt "
                f"(pid {owner.pid}) belonged to its previous start"
            )
        elif owner.pid in living:
            continue
        else:
            cause = f"process {owner.pid} of worker {node} exited while running it"
        if _hand_back(
            runtime, rec.saga_id, rec.name, phase, rec.attempt_for(phase), owner, cause, queue
        ):
            acted += 1
    signals.sweeper_repaired.send(sender=runtime, counts={"worker_lost": acted})
    return acted


def _hand_back(
    rt: Runtime,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    owner: Owner,
    cause: str,
    queue: str | None,
) -> bool:
    with about_saga(saga_id, step=step, phase=phase, attempt=attempt) as about:
        return _hand_back_one(rt, saga_id, step, phase, attempt, owner, cause, queue, about)


def _hand_back_one(
    rt: Runtime,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    owner: Owner,
    cause: str,
    queue: str | None,
    about: SagaLogFields,
) -> bool:
    def decide(state: SagaState) -> Decision | None:
        about.saga_name = state.saga.name
        defn = rt.definition_for(state.saga)
        return (
            None
            if defn is None
            else recovery.claim_lost(
                defn,
                state,
                step,
                phase,
                attempt,
                owner,
                cause=cause,
                now=rt.now(),
                timing=rt.timing,
            )
        )

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
                replace(d, queue=queue) if d.step == step and d.child_saga is None else d
                for d in decision.dispatches
            ]
        else:
            # A stopping worker: a retry's backoff would wait in this process
            # (DelayedPublisher), which is about to exit, and the step would then wait
            # for the sweeper. Publish now; the claim fences by attempt, not by time.
            decision.dispatches = [replace(d, countdown=0.0) for d in decision.dispatches]
        rt.after_commit(decision)
    except Exception:
        log.exception(
            "could not hand back saga %s step %s (%s attempt %s)", saga_id, step, phase, attempt
        )
        return False
    log.warning(
        "saga %s step %s (%s attempt %s): %s; running it again",
        saga_id,
        step,
        phase,
        attempt,
        cause,
    )
    return True


def hand_back_dead_processes(runtime: Runtime) -> None:
    """Hand back the claims of this boot whose process no longer exists."""
    if runtime.worker_node is None or runtime.worker_boot is None:
        return
    try:
        hand_back_lost_claims(
            runtime,
            runtime.worker_node,
            runtime.worker_boot,
            _existing,
            earlier_boots=False,
            stopping=True,
        )
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
