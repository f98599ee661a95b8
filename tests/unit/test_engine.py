"""The pure engine, driven event by event: no broker, no database.

`Run` plays the part of the store and the workers: it applies each Decision the
way a store does (compare-and-set on versions), and claims dispatched messages
the way `claim_step` does, so a test reads as the timeline of one saga.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery

from sagaline import engine, recovery
from sagaline.definition import Saga
from sagaline.records import Decision, Dispatch, Event, Owner, SagaState, StepRecord
from sagaline.states import (
    CompensationStatus,
    FailureStrategy,
    Phase,
    SagaStatus,
    StepStatus,
)
from sagaline.steps import FAIL_FAST_WITH_GRACE, Retry, StepResponse

app = Celery("t_engine", broker="memory://", set_as_current=False)


def _task(name: str) -> Any:
    @app.task(name=f"engine_test.{name}", shared=False)
    def body(**ctx: Any) -> None: ...

    return body


s1, s2, s3, s4, a, b, c, d, x = (
    _task(n) for n in ("s1", "s2", "s3", "s4", "a", "b", "c", "d", "x")
)
undo_s1, undo_s2, undo_s3, undo_a, undo_b, undo_c, undo_x = (
    _task(n) for n in ("undo_s1", "undo_s2", "undo_s3", "undo_a", "undo_b", "undo_c", "undo_x")
)

T0 = 1_000.0
LEASE = 60.0
NO_JITTER = Retry(max_attempts=3, backoff=2.0, factor=2.0, jitter=0.0)


class Run:
    """One saga execution, advanced by hand."""

    def __init__(self, defn: Saga, **input: Any):
        self.defn = defn
        self.now = T0
        self.timing = engine.Timing(redispatch_after=30.0)
        self.state, first = engine.start(defn, "saga-1", input, now=self.now, timing=self.timing)
        self.events: list[Event] = list(first.events)
        self.last = first
        # The latest snapshot handed to a decision, and a copy of it as it was read.
        self.read: tuple[SagaState, SagaState] | None = None

    # -- the store's side ------------------------------------------------------------

    def apply(self, decision: Decision | None) -> Decision | None:
        """Write a decision as a store would: only if the versions it read still hold."""
        if self.read is not None:
            # A store may share the records it read between decisions (redis_cache.py):
            # a decision changes copies of them, never the records themselves.
            snapshot, as_read = self.read
            assert snapshot == as_read
            self.read = None
        if decision is None:
            return None
        if decision.saga is not None:
            assert self.state.saga.version == decision.saga_version
            saga = copy.deepcopy(decision.saga)
            saga.version = decision.saga_version + 1
            self.state.saga = saga
        for s in decision.steps:
            assert self.state.steps[s.name].version == decision.step_versions[s.name]
            rec = copy.deepcopy(s)
            rec.version = decision.step_versions[s.name] + 1
            self.state.steps[s.name] = rec
        self.events += decision.events
        self.last = decision
        return decision

    def claim(self, name: str, phase: Phase = Phase.FORWARD, owner: Owner | None = None) -> int:
        """What `claim_step` does: DISPATCHED(attempt) -> RUNNING with a lease."""
        rec = self.state.steps[name]
        rec.owner_node, rec.owner_boot, rec.owner_pid = (
            (None, None, None) if owner is None else (owner.node, owner.boot, owner.pid)
        )
        if phase is Phase.FORWARD:
            assert rec.status is StepStatus.DISPATCHED, (name, rec.status)
            rec.status = StepStatus.RUNNING
            rec.started_at = self.now
        else:
            assert rec.comp_status is CompensationStatus.DISPATCHED, (name, rec.comp_status)
            rec.comp_status = CompensationStatus.RUNNING
        rec.lease_until = rec.due_at = self.now + LEASE
        rec.version += 1
        return rec.attempt_for(phase)

    # -- the workers' side -----------------------------------------------------------

    def succeed(self, name: str, output: Any = None) -> Decision | None:
        attempt = self.claim(name)
        return self.report_success(name, attempt, output)

    def report_success(self, name: str, attempt: int, output: Any = None) -> Decision | None:
        comp, has_comp = None, False
        if isinstance(output, StepResponse):
            comp, has_comp = output.compensation_data, output.has_compensation_data
            output = output.output
        return self.apply(
            engine.step_succeeded(
                self.defn,
                self.snapshot(),
                name,
                attempt,
                output=output,
                compensation_data=comp,
                has_compensation_data=has_comp,
                now=self.now,
                timing=self.timing,
            )
        )

    def fail(
        self,
        name: str,
        error: str = "Boom: it broke",
        *,
        permanent: bool = False,
        compensation_data: Any = StepResponse._UNSET,
    ) -> Decision | None:
        attempt = self.claim(name)
        return self.report_failure(
            name, attempt, error, permanent=permanent, compensation_data=compensation_data
        )

    def report_failure(
        self,
        name: str,
        attempt: int,
        error: str = "Boom: it broke",
        *,
        permanent: bool = False,
        compensation_data: Any = StepResponse._UNSET,
    ) -> Decision | None:
        has = compensation_data is not StepResponse._UNSET
        return self.apply(
            engine.step_failed(
                self.defn,
                self.snapshot(),
                name,
                attempt,
                error=error,
                permanent=permanent,
                compensation_data=compensation_data if has else None,
                has_compensation_data=has,
                now=self.now,
                timing=self.timing,
            )
        )

    def compensate(self, name: str) -> Decision | None:
        attempt = self.claim(name, Phase.COMPENSATE)
        return self.apply(
            engine.compensation_succeeded(
                self.defn, self.snapshot(), name, attempt, now=self.now, timing=self.timing
            )
        )

    def fail_compensation(self, name: str) -> Decision | None:
        attempt = self.claim(name, Phase.COMPENSATE)
        return self.apply(
            engine.compensation_failed(
                self.defn,
                self.snapshot(),
                name,
                attempt,
                error="Refused: no",
                now=self.now,
                timing=self.timing,
            )
        )

    # -- operators and the sweeper ---------------------------------------------------

    def cancel(self) -> Decision | None:
        return self.apply(
            recovery.cancel(
                self.defn, self.snapshot(), reason="operator", now=self.now, timing=self.timing
            )
        )

    def resume(self) -> Decision | None:
        return self.apply(
            recovery.resume(self.defn, self.snapshot(), now=self.now, timing=self.timing)
        )

    def due(self) -> Decision | None:
        return self.apply(
            recovery.deadline_or_grace_due(
                self.defn, self.snapshot(), now=self.now, timing=self.timing
            )
        )

    def lease_expired(self, name: str) -> Decision | None:
        return self.apply(
            recovery.lease_expired(
                self.defn, self.snapshot(), name, now=self.now, timing=self.timing
            )
        )

    def claim_lost(self, name: str, phase: Phase, attempt: int, owner: Owner) -> Decision | None:
        return self.apply(
            recovery.claim_lost(
                self.defn,
                self.snapshot(),
                name,
                phase,
                attempt,
                owner,
                cause="pool process exited",
                now=self.now,
                timing=self.timing,
            )
        )

    def redispatch(self, name: str) -> Decision | None:
        return self.apply(
            recovery.redispatch(self.defn, self.snapshot(), name, now=self.now, timing=self.timing)
        )

    # -- reading -----------------------------------------------------------------------

    def snapshot(self) -> SagaState:
        snapshot = copy.deepcopy(self.state)
        self.read = (snapshot, copy.deepcopy(snapshot))
        return snapshot

    @property
    def status(self) -> SagaStatus:
        return self.state.saga.status

    def step(self, name: str) -> StepRecord:
        return self.state.steps[name]

    def statuses(self) -> dict[str, str]:
        return {n: s.status.value for n, s in self.state.steps.items()}

    def comp_statuses(self) -> dict[str, str | None]:
        return {
            n: None if s.comp_status is None else s.comp_status.value
            for n, s in self.state.steps.items()
        }

    def dispatched(self, phase: Phase | None = None) -> list[str]:
        """Steps the last decision asked to publish."""
        return [dp.step for dp in self.last.dispatches if phase is None or dp.phase is phase]

    def dispatch_of(self, name: str) -> Dispatch:
        (found,) = [dp for dp in self.last.dispatches if dp.step == name]
        return found

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def linear(name: str, n: int = 3, **options: Any) -> Saga:
    tasks, undos = [s1, s2, s3, s4][:n], [undo_s1, undo_s2, undo_s3, None][:n]
    saga = Saga(name, **options)
    for task, undo in zip(tasks, undos, strict=True):
        if undo is None:
            saga.add_step(task, no_compensation=True)
        else:
            saga.add_step(task, compensate=undo)
    return saga


def fan_out(name: str, **options: Any) -> Saga:
    """a -> (b, c, x) -> d, every step but d compensable."""
    return (
        Saga(name, **options)
        .add_step(a, compensate=undo_a)
        .add_step(b, compensate=undo_b, depends_on=["a"])
        .add_step(c, compensate=undo_c, depends_on=["a"])
        .add_step(x, compensate=undo_x, depends_on=["a"])
        .add_step(d, no_compensation=True, depends_on=["b", "c", "x"])
    )


# -- forward -------------------------------------------------------------------------


def test_start_writes_a_running_saga_and_dispatches_only_the_root() -> None:
    run = Run(linear("eng_start"), order_id="o-1")
    assert run.status is SagaStatus.RUNNING
    assert run.state.saga.fingerprint == run.defn.fingerprint
    assert run.dispatched() == ["s1"]
    dp = run.dispatch_of("s1")
    assert (dp.task_name, dp.phase, dp.attempt) == ("engine_test.s1", Phase.FORWARD, 1)
    assert dp.kwargs == {"order_id": "o-1", "saga_id": "saga-1"}
    assert run.statuses() == {"s1": "DISPATCHED", "s2": "PENDING", "s3": "PENDING"}
    assert run.step("s1").due_at == T0 + 30.0  # the sweeper republishes a lost message
    assert run.kinds() == ["saga_started", "step_dispatched"]


def test_linear_saga_dispatches_one_step_at_a_time_and_merges_outputs_in_order() -> None:
    run = Run(linear("eng_linear"), order_id="o-1", amount=5)
    run.succeed("s1", {"x": 1, "amount": 6})
    assert run.dispatched() == ["s2"]
    assert run.dispatch_of("s2").kwargs == {
        "order_id": "o-1",
        "amount": 6,
        "x": 1,
        "saga_id": "saga-1",
    }
    assert run.statuses()["s3"] == "PENDING"
    run.succeed("s2", 42)  # not a dict: stored under the step's name
    assert run.dispatch_of("s3").kwargs["s2"] == 42
    run.succeed("s3", {"x": 3})
    assert run.status is SagaStatus.COMPLETED
    assert run.state.saga.output == {"order_id": "o-1", "amount": 6, "x": 3, "s2": 42}
    assert run.state.saga.finished_at == T0
    assert run.state.saga.due_at is None
    assert run.kinds()[-1] == "saga_completed"


def test_none_output_adds_nothing_to_the_context() -> None:
    run = Run(linear("eng_none", 2), k=1)
    run.succeed("s1", None)
    assert run.dispatch_of("s2").kwargs == {"k": 1, "saga_id": "saga-1"}


def test_parallel_branches_are_dispatched_together_and_joined() -> None:
    defn = (
        Saga("eng_dag")
        .add_step(a, compensate=undo_a)
        .add_parallel(b, c, compensate=None)
        .add_step(d, no_compensation=True)
    )
    run = Run(defn, n=0)
    run.succeed("a", {"from_a": 1})
    assert sorted(run.dispatched()) == ["b", "c"]
    run.succeed("c", {"from_c": 3})
    assert run.dispatched() == []  # d waits for b
    assert run.statuses()["d"] == "PENDING"
    # b's context holds its ancestors only, never a sibling's output: see b's redispatch.
    run.now = T0 + 31
    run.redispatch("b")
    assert run.dispatch_of("b").kwargs == {"n": 0, "from_a": 1, "saga_id": "saga-1"}
    run.succeed("b", {"from_b": 2})
    assert run.dispatched() == ["d"]
    assert run.dispatch_of("d").kwargs == {
        "n": 0,
        "from_a": 1,
        "from_b": 2,
        "from_c": 3,
        "saga_id": "saga-1",
    }
    run.succeed("d")
    assert run.status is SagaStatus.COMPLETED


def test_step_options_are_carried_by_the_dispatch() -> None:
    defn = Saga("eng_opts", queue="q-saga").add_step(a, timeout=7, queue="q-step").add_step(b)
    run = Run(defn)
    dp = run.dispatch_of("a")
    assert (dp.queue, dp.timeout, dp.saga_name, dp.fingerprint) == (
        "q-step",
        7,
        "eng_opts",
        defn.fingerprint,
    )
    run.succeed("a")
    assert run.dispatch_of("b").queue == "q-saga"


# -- rolling back --------------------------------------------------------------------


def test_failure_of_the_last_step_compensates_in_reverse_order_one_at_a_time() -> None:
    run = Run(linear("eng_reverse", 4), amount=10)
    run.succeed("s1", {"charged": 10})
    run.succeed("s2", StepResponse(output={"reserved": True}, compensation_data={"lot": 7}))
    run.succeed("s3", "label-123")
    run.fail("s4", "ValueError: no courier")
    assert run.status is SagaStatus.COMPENSATING
    assert run.state.saga.failed_step == "s4"
    assert run.state.saga.error == "ValueError: no courier"
    assert run.statuses()["s4"] == "FAILED"

    assert run.dispatched(Phase.COMPENSATE) == ["s3"]
    dp = run.dispatch_of("s3")
    assert dp.task_name == "engine_test.undo_s3"
    assert dp.kwargs["compensation_data"] == "label-123"  # default: the output
    assert dp.kwargs["amount"] == 10 and dp.kwargs["saga_id"] == "saga-1"

    run.compensate("s3")
    assert run.dispatched() == ["s2"]
    assert run.dispatch_of("s2").kwargs["compensation_data"] == {"lot": 7}
    assert run.comp_statuses()["s1"] is None

    run.compensate("s2")
    assert run.dispatched() == ["s1"]
    assert run.dispatch_of("s1").kwargs["compensation_data"] == {"charged": 10}

    run.compensate("s1")
    assert run.status is SagaStatus.COMPENSATED
    assert run.comp_statuses() == {
        "s1": "COMPENSATED",
        "s2": "COMPENSATED",
        "s3": "COMPENSATED",
        "s4": None,
    }
    assert run.kinds()[-1] == "saga_compensated"


def test_fail_fast_lets_a_running_sibling_finish_and_then_compensates_it() -> None:
    run = Run(fan_out("eng_fail_fast"))
    run.succeed("a", {"a": 1})
    run.claim("b")  # b is running; x stays DISPATCHED (its message not yet taken)
    run.fail("c")
    assert run.status is SagaStatus.COMPENSATING
    assert run.statuses() == {
        "a": "SUCCEEDED",
        "b": "RUNNING",
        "c": "FAILED",
        "x": "CANCELLED",
        "d": "CANCELLED",
    }
    assert run.dispatched() == []  # a's compensation waits for b's outcome

    run.report_success("b", 1, {"b": 2})
    assert run.statuses()["b"] == "SUCCEEDED"
    late = [e for e in run.events if e.kind == "step_succeeded" and e.step == "b"]
    assert late[0].detail == {"after_rollback_began": True}
    assert run.dispatched() == ["b"]  # compensated because it finished after the rollback
    assert run.statuses()["d"] == "CANCELLED"  # nothing moves forward any more

    run.compensate("b")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED
    assert run.comp_statuses()["x"] is None


def test_wait_all_dispatches_no_compensation_while_a_forward_step_is_in_flight() -> None:
    run = Run(fan_out("eng_wait_all", failure_strategy=FailureStrategy.WAIT_ALL))
    run.succeed("a")
    run.claim("b")
    run.fail("c")
    assert run.status is SagaStatus.COMPENSATING
    assert run.statuses() == {
        "a": "SUCCEEDED",
        "b": "RUNNING",
        "c": "FAILED",
        "x": "DISPATCHED",
        "d": "CANCELLED",
    }
    assert run.dispatched() == []
    run.report_success("b", 1)
    assert run.dispatched() == []  # x is still in flight
    run.succeed("x")
    assert sorted(run.dispatched(Phase.COMPENSATE)) == ["b", "x"]  # independent: parallel
    run.compensate("x")
    assert run.dispatched() == []
    run.compensate("b")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED


def test_fail_fast_with_grace_abandons_still_running_steps_and_compensates_them() -> None:
    run = Run(fan_out("eng_grace", failure_strategy=FAIL_FAST_WITH_GRACE(grace=30)))
    run.succeed("a")
    run.claim("b")
    run.claim("x")
    run.now = T0 + 5
    run.fail("c")
    assert run.status is SagaStatus.COMPENSATING
    assert run.state.saga.due_at == T0 + 35
    assert run.dispatched() == []

    run.now = T0 + 34
    assert run.due() is None  # the grace period is not over
    run.report_success("x", 1, {"x": 1})
    assert run.dispatched() == ["x"]  # finished within grace: compensated normally
    run.compensate("x")

    run.now = T0 + 36
    run.due()
    b_rec = run.step("b")
    assert b_rec.status is StepStatus.FAILED
    assert b_rec.has_compensation_data
    assert "grace period" in (b_rec.error or "")
    assert run.state.saga.due_at is None
    assert "step_abandoned" in run.kinds()
    assert run.dispatched() == ["b"]  # its outcome is unknown: undo it
    # b's worker reporting later is a stale event now.
    assert (
        engine.step_succeeded(
            run.defn,
            run.snapshot(),
            "b",
            1,
            output=None,
            compensation_data=None,
            has_compensation_data=False,
            now=run.now,
            timing=run.timing,
        )
        is None
    )
    run.compensate("b")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED


def test_a_skipped_step_is_never_compensated() -> None:
    defn = (
        Saga("eng_skip")
        .add_step(a, compensate=undo_a)
        .add_step(b, compensate=undo_b, when=lambda ctx: ctx["ship"])
        .add_step(c, compensate=undo_c)
    )
    run = Run(defn, ship=False)
    run.succeed("a")
    assert run.statuses()["b"] == "SKIPPED"
    assert run.dispatched() == ["c"]  # dependents of a skipped step proceed
    assert "step_skipped" in run.kinds()
    run.fail("c")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED
    assert run.comp_statuses() == {"a": "COMPENSATED", "b": None, "c": None}


# -- retries and fencing -------------------------------------------------------------


def test_failed_attempt_with_attempts_left_is_redispatched_after_the_backoff() -> None:
    defn = Saga("eng_retry").add_step(a, compensate=undo_a).add_step(b, retry=NO_JITTER)
    run = Run(defn)
    run.succeed("a", {"a": 1})
    run.fail("b")
    rec = run.step("b")
    assert (rec.status, rec.attempt) == (StepStatus.DISPATCHED, 2)
    dp = run.dispatch_of("b")
    assert (dp.attempt, dp.countdown) == (2, 2.0)
    assert dp.kwargs == {"a": 1, "saga_id": "saga-1"}
    assert rec.due_at == T0 + 2.0 + 30.0
    assert run.status is SagaStatus.RUNNING
    retry_event = run.events[-1]
    assert (retry_event.kind, retry_event.attempt) == ("step_attempt_failed", 1)
    assert retry_event.detail["retry_in"] == 2.0

    run.fail("b")
    assert run.dispatch_of("b").countdown == 4.0  # backoff * factor
    assert run.step("b").attempt == 3

    run.fail("b")  # the third and last attempt
    assert run.statuses()["b"] == "FAILED"
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["a"]


def test_retry_countdown_follows_the_policy_with_jitter() -> None:
    defn = Saga("eng_jitter").add_step(a, retry=Retry(max_attempts=2, backoff=10.0, jitter=0.1))
    run = Run(defn)
    run.fail("a")
    assert 9.0 <= run.dispatch_of("a").countdown <= 11.0


def test_permanent_failure_skips_retries() -> None:
    defn = (
        Saga("eng_permanent")
        .add_step(a, compensate=undo_a)
        .add_step(b, compensate=undo_b, retry=Retry(max_attempts=5))
    )
    run = Run(defn)
    run.succeed("a")
    run.fail("b", "StepFailure: card declined", permanent=True)
    assert run.step("b").attempt == 1
    assert run.statuses()["b"] == "FAILED"
    assert run.dispatched() == ["a"]  # b gave no compensation data: only a is undone
    assert run.comp_statuses()["b"] is None


def test_permanent_failure_with_compensation_data_compensates_the_failing_step_first() -> None:
    defn = (
        Saga("eng_partial")
        .add_step(a, compensate=undo_a)
        .add_step(b, compensate=undo_b, retry=Retry(max_attempts=5))
    )
    run = Run(defn)
    run.succeed("a")
    run.fail("b", "StepFailure: half done", permanent=True, compensation_data={"hold": 9})
    rec = run.step("b")
    assert rec.has_compensation_data and rec.compensation_data == {"hold": 9}
    assert run.dispatched() == ["b"]
    assert run.dispatch_of("b").kwargs["compensation_data"] == {"hold": 9}
    run.compensate("b")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED


def test_stale_events_decide_nothing() -> None:
    defn = Saga("eng_stale").add_step(a, compensate=undo_a, retry=NO_JITTER).add_step(b)
    run = Run(defn)
    snap = run.snapshot()
    kwargs: dict[str, Any] = {"now": run.now, "timing": run.timing}
    # Not claimed yet (DISPATCHED): a completion cannot come from a running attempt.
    assert (
        engine.step_succeeded(
            defn,
            snap,
            "a",
            1,
            output=1,
            compensation_data=None,
            has_compensation_data=False,
            **kwargs,
        )
        is None
    )
    run.fail("a")  # attempt 1 failed, attempt 2 dispatched
    attempt = run.claim("a")
    assert attempt == 2
    snap = run.snapshot()
    # A duplicate of attempt 1 reporting late is fenced off.
    assert (
        engine.step_succeeded(
            defn,
            snap,
            "a",
            1,
            output=1,
            compensation_data=None,
            has_compensation_data=False,
            **kwargs,
        )
        is None
    )
    assert engine.step_failed(defn, snap, "a", 1, error="late", **kwargs) is None
    run.report_success("a", 2, {"ok": True})
    snap = run.snapshot()
    # A second report of the same attempt finds the step settled.
    assert (
        engine.step_succeeded(
            defn,
            snap,
            "a",
            2,
            output=1,
            compensation_data=None,
            has_compensation_data=False,
            **kwargs,
        )
        is None
    )
    # Compensation events for a compensation that is not running.
    assert engine.compensation_succeeded(defn, snap, "a", 1, **kwargs) is None
    assert engine.compensation_failed(defn, snap, "a", 1, error="x", **kwargs) is None


def test_compensation_events_are_fenced_by_comp_attempt() -> None:
    defn = (
        Saga("eng_comp_fence")
        .add_step(
            a, compensate=undo_a, compensation_retry=Retry(max_attempts=3, backoff=1.0, jitter=0.0)
        )
        .add_step(b)
    )
    run = Run(defn)
    run.succeed("a")
    run.fail("b")
    run.fail_compensation("a")
    run.claim("a", Phase.COMPENSATE)
    snap = run.snapshot()
    assert engine.compensation_succeeded(defn, snap, "a", 1, now=run.now, timing=run.timing) is None
    assert (
        engine.compensation_succeeded(defn, snap, "a", 2, now=run.now, timing=run.timing)
        is not None
    )


def test_compensation_is_retried_then_fails_the_saga_and_resume_retries_only_it() -> None:
    comp_retry = Retry(max_attempts=2, backoff=1.0, factor=2.0, jitter=0.0)
    defn = (
        Saga("eng_comp_fail")
        .add_step(a, compensate=undo_a)
        .add_step(b, compensate=undo_b, depends_on=["a"], compensation_retry=comp_retry)
        .add_step(c, compensate=undo_c, depends_on=["a"], compensation_retry=comp_retry)
        .add_step(d, depends_on=["b", "c"])
    )
    run = Run(defn)
    run.succeed("a")
    run.succeed("b")
    run.succeed("c")
    run.fail("d")
    assert sorted(run.dispatched()) == ["b", "c"]

    run.compensate("b")
    run.fail_compensation("c")
    rec = run.step("c")
    assert (rec.comp_status, rec.comp_attempt) == (CompensationStatus.DISPATCHED, 2)
    assert run.dispatch_of("c").countdown == 1.0
    assert run.status is SagaStatus.COMPENSATING

    run.fail_compensation("c")  # attempts exhausted
    assert run.step("c").comp_status is CompensationStatus.COMPENSATION_FAILED
    assert run.step("c").comp_error == "Refused: no"
    assert run.status is SagaStatus.FAILED
    failed = run.events[-1]
    assert failed.kind == "saga_failed"
    assert failed.detail["compensation_failed"] == ["c"]
    assert failed.detail["still_applied"] == ["a", "c"]
    assert run.comp_statuses()["a"] is None  # a waits for c: its dependent is still applied

    run.resume()
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["c"]  # b was compensated already: not run again
    assert run.dispatch_of("c").attempt == 1
    run.compensate("c")
    assert run.dispatched() == ["a"]
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED
    assert [e.step for e in run.events if e.kind == "compensation_started"].count("b") == 0


def test_resume_is_refused_unless_the_saga_failed() -> None:
    run = Run(linear("eng_resume_running"))
    assert run.resume() is None


# -- pivot ---------------------------------------------------------------------------


def test_after_a_pivot_a_failure_is_retried_forward_instead_of_compensated() -> None:
    defn = (
        Saga("eng_pivot", pivot_retry=Retry(max_attempts=3, backoff=1.0, jitter=0.0))
        .add_step(s1, compensate=undo_s1)
        .add_step(s2, compensate=undo_s2, pivot=True)
        .add_step(s3, compensate=undo_s3)
    )
    run = Run(defn)
    run.succeed("s1")
    run.succeed("s2")
    assert "pivot_passed" in run.kinds()
    run.fail("s3")
    assert run.status is SagaStatus.RUNNING
    assert run.step("s3").attempt == 2
    assert run.dispatch_of("s3").countdown == 1.0
    assert run.events[-1].detail["retry_forward"] is True
    run.fail("s3")
    run.fail("s3")
    assert run.status is SagaStatus.FAILED
    assert run.state.saga.failed_step == "s3"
    assert run.events[-1].kind == "saga_failed"
    assert run.events[-1].detail["reason"] == "forward_retries_exhausted_after_pivot"
    assert run.comp_statuses() == {"s1": None, "s2": None, "s3": None}
    assert run.dispatched() == []


def test_before_the_pivot_a_failure_is_compensated() -> None:
    defn = (
        Saga("eng_pre_pivot")
        .add_step(s1, compensate=undo_s1)
        .add_step(s2, compensate=undo_s2, pivot=True)
    )
    run = Run(defn)
    run.succeed("s1")
    run.fail("s2")
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["s1"]


# -- transforms, conditions, input mappers -----------------------------------------------


def test_transform_is_applied_inline_and_its_output_is_the_diff() -> None:
    defn = (
        Saga("eng_transform")
        .add_step(a, compensate=undo_a)
        .add_transform(lambda ctx: {**ctx, "cents": int(ctx["amount"] * 100)})
        .add_step(b, compensate=undo_b)
    )
    run = Run(defn, amount=9.99)
    run.succeed("a", {"txn": "t1"})
    tr = run.step("transform_2")
    assert tr.status is StepStatus.SUCCEEDED
    assert tr.output == {"cents": 999}
    assert run.dispatched() == ["b"]
    assert run.dispatch_of("b").kwargs == {
        "amount": 9.99,
        "txn": "t1",
        "cents": 999,
        "saga_id": "saga-1",
    }
    run.fail("b")
    assert run.dispatched() == ["a"]  # a transform has nothing to undo
    run.compensate("a")
    assert run.status is SagaStatus.COMPENSATED
    assert run.step("transform_2").comp_status is None


def test_condition_false_skips_the_step_and_dependents_proceed() -> None:
    defn = Saga("eng_when").add_step(a).add_step(b, when=lambda ctx: ctx["n"] > 5).add_step(c)
    run = Run(defn, n=1)
    assert run.statuses()["a"] == "DISPATCHED"
    run.succeed("a")
    assert run.statuses()["b"] == "SKIPPED"
    assert run.dispatched() == ["c"]
    run.succeed("c")
    assert run.status is SagaStatus.COMPLETED


def test_input_mapper_result_is_the_dispatched_kwargs() -> None:
    defn = Saga("eng_input").add_step(a, input=lambda ctx: {"order": ctx["order_id"].upper()})
    run = Run(defn, order_id="o-1", noise=True)
    assert run.dispatch_of("a").kwargs == {"order": "O-1", "saga_id": "saga-1"}


def test_a_raising_condition_fails_the_step_and_rolls_back() -> None:
    defn = (
        Saga("eng_when_raises")
        .add_step(a, compensate=undo_a)
        .add_step(b, when=lambda ctx: ctx["missing"])
    )
    run = Run(defn)
    run.succeed("a")
    rec = run.step("b")
    assert rec.status is StepStatus.FAILED
    assert (rec.error or "").startswith("KeyError")
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["a"]


# -- operators, the sweeper, deadlines ---------------------------------------------------


def test_cancel_of_a_running_saga_starts_the_rollback() -> None:
    run = Run(linear("eng_cancel"))
    run.succeed("s1")
    run.cancel()
    assert run.status is SagaStatus.COMPENSATING
    assert run.state.saga.error == "operator"
    assert run.statuses()["s2"] == "CANCELLED"  # it was DISPATCHED: its claim will fail
    assert run.dispatched() == ["s1"]
    run.compensate("s1")
    assert run.status is SagaStatus.COMPENSATED


def test_cancel_of_a_completed_saga_decides_nothing() -> None:
    run = Run(linear("eng_cancel_done", 1))
    run.succeed("s1")
    assert run.status is SagaStatus.COMPLETED
    assert (
        recovery.cancel(run.defn, run.snapshot(), reason="late", now=run.now, timing=run.timing)
        is None
    )


def test_expired_lease_of_a_running_step_counts_as_a_failed_attempt() -> None:
    defn = Saga("eng_lease").add_step(a, compensate=undo_a).add_step(b, retry=NO_JITTER)
    run = Run(defn)
    run.succeed("a")
    run.claim("b")
    run.now = T0 + LEASE - 1
    assert run.lease_expired("b") is None  # the lease still holds
    run.now = T0 + LEASE + 1
    run.lease_expired("b")
    assert (run.step("b").status, run.step("b").attempt) == (StepStatus.DISPATCHED, 2)
    assert run.events[-1].detail["reason"] == "lease_expired"
    # the attempt that was presumed dead reports after all: fenced.
    assert run.report_success("b", 1) is None


def test_expired_leases_are_retried_as_crashes_then_roll_back() -> None:
    run = Run(linear("eng_lease_fail", 2))
    run.succeed("s1")
    crash_retries = run.timing.crash_retries
    for attempt in range(1, crash_retries + 2):
        assert run.claim("s2") == attempt
        run.now += LEASE + 1
        run.lease_expired("s2")
        if attempt <= crash_retries:  # a crash is not a business failure: run it again
            assert (run.statuses()["s2"], run.step("s2").attempt) == ("DISPATCHED", attempt + 1)
    assert run.statuses()["s2"] == "FAILED"
    # Its last run may have applied something: it is undone first, then s1.
    assert run.dispatched() == ["s2"]
    assert run.dispatch_of("s2").kwargs["compensation_data"] is None


def test_expired_lease_without_crash_retries_fails_the_step_at_once() -> None:
    run = Run(linear("eng_lease_fail_now", 2))
    run.timing = replace(run.timing, crash_retries=0)
    run.succeed("s1")
    run.claim("s2")
    run.now = T0 + LEASE + 1
    run.lease_expired("s2")
    assert run.statuses()["s2"] == "FAILED"
    assert "LeaseExpired" in (run.step("s2").error or "")
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["s2"]  # outcome unknown: undone before s1


def test_expired_lease_of_a_running_compensation_retries_it() -> None:
    run = Run(linear("eng_comp_lease", 2))
    run.succeed("s1")
    run.fail("s2")
    run.claim("s1", Phase.COMPENSATE)
    run.now = T0 + LEASE + 1
    run.lease_expired("s1")
    assert run.step("s1").comp_status is CompensationStatus.DISPATCHED
    assert run.step("s1").comp_attempt == 2


OWNER = Owner("w1@host", "boot-1", 101)


def test_a_lost_claim_is_a_crashed_attempt_at_once_without_waiting_for_the_lease() -> None:
    defn = Saga("eng_lost").add_step(a, compensate=undo_a).add_step(b, retry=NO_JITTER)
    run = Run(defn)
    run.succeed("a")
    attempt = run.claim("b", owner=OWNER)
    run.now = T0 + 1  # the lease holds for another minute
    assert run.claim_lost("b", Phase.FORWARD, attempt, OWNER) is not None
    assert (run.step("b").status, run.step("b").attempt) == (StepStatus.DISPATCHED, 2)
    (failed,) = [e for e in run.events if e.kind == "step_attempt_failed"]
    assert (failed.step, failed.attempt, failed.detail["reason"]) == ("b", 1, "worker_lost")
    assert "WorkerLost: pool process exited" in failed.detail["error"]
    # Possibly applied: it is undone even if its retry never runs.
    assert run.step("b").has_compensation_data
    assert run.dispatched() == ["b"]
    # The attempt presumed dead reports after all: fenced.
    assert run.report_success("b", attempt) is None


def test_a_lost_claim_is_fenced_by_attempt_owner_and_phase() -> None:
    run = Run(linear("eng_lost_fence", 2))
    run.succeed("s1")
    attempt = run.claim("s2", owner=OWNER)
    for other in (
        Owner("w1@host", "boot-1", 102),
        Owner("w1@host", "boot-2", 101),
        Owner("w2@host", "boot-1", 101),
    ):
        assert run.claim_lost("s2", Phase.FORWARD, attempt, other) is None
    assert run.claim_lost("s2", Phase.FORWARD, attempt + 1, OWNER) is None
    assert run.claim_lost("s2", Phase.COMPENSATE, attempt, OWNER) is None
    assert run.step("s2").status is StepStatus.RUNNING
    # Completed before the hand-back: nothing to hand back.
    run.report_success("s2", attempt)
    assert run.claim_lost("s2", Phase.FORWARD, attempt, OWNER) is None
    assert run.status is SagaStatus.COMPLETED


def test_lost_claims_count_against_crash_retries_like_expired_leases() -> None:
    run = Run(linear("eng_lost_retries", 2))
    run.succeed("s1")
    crash_retries = run.timing.crash_retries
    for attempt in range(1, crash_retries + 2):
        assert run.claim("s2", owner=OWNER) == attempt
        if attempt % 2:
            run.claim_lost("s2", Phase.FORWARD, attempt, OWNER)
        else:
            run.now += LEASE + 1
            run.lease_expired("s2")
    assert run.statuses()["s2"] == "FAILED"
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched() == ["s2"]  # outcome unknown: undone before s1


def test_a_lost_compensation_claim_retries_the_compensation() -> None:
    run = Run(linear("eng_comp_lost", 2))
    run.succeed("s1")
    run.fail("s2")
    attempt = run.claim("s1", Phase.COMPENSATE, owner=OWNER)
    run.claim_lost("s1", Phase.COMPENSATE, attempt, OWNER)
    assert run.step("s1").comp_status is CompensationStatus.DISPATCHED
    assert run.step("s1").comp_attempt == 2
    assert run.events[-1].detail["reason"] == "worker_lost"


def test_redispatch_republishes_the_same_attempt_only_when_due() -> None:
    run = Run(linear("eng_redispatch"))
    run.now = T0 + 29
    assert run.redispatch("s1") is None
    run.now = T0 + 31
    run.redispatch("s1")
    dp = run.dispatch_of("s1")
    assert (dp.attempt, dp.phase) == (1, Phase.FORWARD)
    # Backs off: the next re-publish is due after 2 x redispatch_after, then 4 x ...
    assert run.step("s1").due_at == T0 + 31 + 2 * 30
    assert run.step("s1").redispatches == 1
    assert run.events[-1].kind == "step_redispatched"
    assert run.kinds().count("step_dispatched") == 1  # a republish is not a new dispatch
    run.claim("s1")
    run.now = T0 + 200
    assert run.redispatch("s1") is None  # running: a lease matter, not a lost message


def test_redispatch_republishes_a_dispatched_compensation() -> None:
    run = Run(linear("eng_redispatch_comp", 2))
    run.succeed("s1")
    run.fail("s2")
    run.now = T0 + 31
    run.redispatch("s1")
    dp = run.dispatch_of("s1")
    assert (dp.phase, dp.attempt, dp.task_name) == (Phase.COMPENSATE, 1, "engine_test.undo_s1")


def test_deadline_passed_rolls_the_saga_back() -> None:
    run = Run(linear("eng_deadline", timeout=60))
    assert run.state.saga.deadline == T0 + 60
    assert run.state.saga.due_at == T0 + 60
    run.succeed("s1")
    run.now = T0 + 59
    assert run.due() is None
    run.now = T0 + 61
    run.due()
    assert run.status is SagaStatus.COMPENSATING
    assert "deadline" in (run.state.saga.error or "")
    assert "saga_deadline_exceeded" in run.kinds()
    assert run.statuses()["s2"] == "CANCELLED"
    assert run.dispatched() == ["s1"]


def test_a_saga_without_timeout_has_no_deadline() -> None:
    run = Run(linear("eng_no_deadline"))
    assert run.state.saga.deadline is None and run.state.saga.due_at is None
    run.now = T0 + 10_000
    assert run.due() is None


def test_decisions_carry_the_versions_they_read() -> None:
    run = Run(linear("eng_versions", 2))
    run.claim("s1")
    snap = run.snapshot()
    decision = engine.step_succeeded(
        run.defn,
        snap,
        "s1",
        1,
        output=None,
        compensation_data=None,
        has_compensation_data=False,
        now=run.now,
        timing=run.timing,
    )
    assert decision is not None
    assert decision.step_versions == {"s1": 1, "s2": 0}
    assert [s.name for s in decision.steps] == ["s1", "s2"]
    assert decision.saga is None  # the saga row is not rewritten for a step transition
    # The engine works on a copy: the state it was given is untouched.
    assert snap.steps["s1"].status is StepStatus.RUNNING
    assert snap.steps["s2"].status is StepStatus.PENDING


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("eng_bad_transform_str", lambda ctx: "not a dict"),
        ("eng_bad_transform_object", lambda ctx: {"x": object()}),
    ],
)
def test_a_transform_returning_no_json_dict_fails_the_saga(name: str, bad: Any) -> None:
    defn = Saga(name).add_step(a, compensate=undo_a).add_transform(bad)
    run = Run(defn)
    run.succeed("a")
    assert run.statuses()["transform_2"] == "FAILED"
    assert run.status is SagaStatus.COMPENSATING


def test_resume_after_pivot_failure_retries_forward_not_compensation() -> None:
    defn = (
        Saga("eng_pivot_resume", pivot_retry=Retry(max_attempts=1, jitter=0.0))
        .add_step(s1, compensate=undo_s1)
        .add_step(s2, compensate=undo_s2, pivot=True)
        .add_step(s3, compensate=undo_s3)
    )
    run = Run(defn)
    run.succeed("s1")
    run.succeed("s2")
    run.fail("s3")
    assert run.status is SagaStatus.FAILED
    run.resume()
    assert run.status is SagaStatus.RUNNING
    assert run.dispatched() == ["s3"] and run.dispatch_of("s3").phase is Phase.FORWARD


def test_a_step_whose_worker_died_during_rollback_is_compensated_too() -> None:
    run = Run(fan_out("eng_lease_during_rollback"))
    run.succeed("a")
    run.claim("b")
    run.fail("c")
    run.now = T0 + LEASE + 1
    run.lease_expired("b")
    assert run.step("b").has_compensation_data
    assert run.step("b").compensation_data is None
    assert run.dispatched() == ["b"]


def test_repeated_redispatches_back_off_exponentially_up_to_a_cap() -> None:
    run = Run(linear("eng_redispatch_backoff"))
    gaps = []
    for _ in range(7):
        due = run.step("s1").due_at
        assert due is not None
        run.now = due + 0.001
        run.redispatch("s1")
        gaps.append(round(run.step("s1").due_at - run.now))
    assert gaps == [60, 120, 240, 480, 960, 960, 960]
    assert run.kinds().count("step_redispatched") == 7


def test_a_crashed_attempt_whose_retry_is_cancelled_is_still_compensated() -> None:
    # a's first attempt may have applied its effect before its worker died; its retry
    # is still queued when b fails: a must be undone all the same.
    run = Run(fan_out("eng_crash_then_cancel"))
    run.succeed("a")
    run.claim("b")
    run.now = T0 + LEASE + 1
    run.lease_expired("b")
    assert run.step("b").status.value == "DISPATCHED" and run.step("b").attempt == 2
    run.fail("c")
    assert run.step("b").status.value == "CANCELLED"
    assert run.dispatched() == ["b"]
    assert run.dispatch_of("b").kwargs["compensation_data"] is None
    run.compensate("b")
    assert run.dispatched() == ["a"]


def test_a_step_that_fails_normally_after_a_crashed_attempt_is_compensated() -> None:
    run = Run(linear("eng_crash_then_fail", 2))
    run.succeed("s1")
    run.claim("s2")
    run.now = T0 + LEASE + 1
    run.lease_expired("s2")
    run.fail("s2", permanent=True)
    assert run.step("s2").status.value == "FAILED" and run.step("s2").has_compensation_data
    assert run.dispatched() == ["s2"]


def test_a_message_refused_by_other_code_is_offered_again_soon() -> None:
    run = Run(linear("eng_refused"))
    for _ in range(3):  # a backlog made its re-publishes back off
        run.now = (run.step("s1").due_at or T0) + 0.001
        run.redispatch("s1")
    assert run.step("s1").redispatches == 3
    event = Event("saga-1", "definition_mismatch", run.now, "s1", 1, "forward", {})
    decision = recovery.refused_message(run.snapshot(), event, Phase.FORWARD, timing=run.timing)
    run.apply(decision)
    assert run.step("s1").redispatches == 0
    assert run.step("s1").due_at == run.now + run.timing.redispatch_after
    assert run.events[-1].kind == "definition_mismatch"
    # A refusal of a stale attempt changes nothing but the history.
    stale = Event("saga-1", "definition_mismatch", run.now, "s1", 7, "forward", {})
    assert (
        recovery.refused_message(run.snapshot(), stale, Phase.FORWARD, timing=run.timing).steps
        == []
    )


def test_a_misspelled_field_in_an_engine_update_raises() -> None:
    run = Run(linear("eng_typo"))
    w = engine.Work(run.defn, run.snapshot(), run.now, run.timing)
    # Records are slots dataclasses: an unknown attribute is refused, rather than
    # set on the copy and silently never written by any store.
    with pytest.raises(AttributeError, match="lease_untl"):
        w.update_step("s1", lease_untl=T0 + LEASE)
    with pytest.raises(AttributeError, match="finshed_at"):
        w.update_saga(finshed_at=T0)
    with pytest.raises(AttributeError, match="stauts"):
        run.step("s1").stauts = StepStatus.RUNNING  # type: ignore[attr-defined]


def test_a_decision_copies_only_the_steps_it_changes() -> None:
    run = Run(linear("eng_cow"))
    run.succeed("s1")
    attempt = run.claim("s2")
    read = run.snapshot()
    as_read = copy.deepcopy(read)
    decision = engine.step_succeeded(
        run.defn,
        read,
        "s2",
        attempt,
        output={"x": 1},
        compensation_data=None,
        has_compensation_data=False,
        now=run.now,
        timing=run.timing,
    )
    assert decision is not None
    assert [s.name for s in decision.steps] == ["s2", "s3"]
    assert all(s is not read.steps[s.name] for s in decision.steps)
    # What a store read (and may hold for its next read) is as it was.
    assert read == as_read
    w = engine.Work(run.defn, read, run.now, run.timing)
    w.update_step("s3", status=StepStatus.DISPATCHED, attempt=1)
    assert w.steps["s1"] is read.steps["s1"]
    assert w.steps["s3"] is not read.steps["s3"]
    assert read.steps["s3"].status is StepStatus.PENDING


# -- a message whose process died: recovery.message_lost ------------------------------------


def _message_lost(
    run: Run, name: str, phase: Phase, attempt: int, owner: Owner | None
) -> Decision | None:
    return run.apply(
        recovery.message_lost(
            run.defn,
            run.snapshot(),
            name,
            phase,
            attempt,
            owner,
            cause="pool process exited",
            now=run.now,
            timing=run.timing,
        )
    )


def test_a_message_lost_before_its_claim_is_published_again_at_once() -> None:
    run = Run(linear("eng_msg_unclaimed", 2))
    run.now = T0 + 1  # long before redispatch_after
    assert _message_lost(run, "s1", Phase.FORWARD, 1, OWNER) is not None
    assert run.dispatched() == ["s1"]
    assert run.dispatch_of("s1").attempt == 1  # the same attempt: a copy is fenced
    assert run.events[-1].kind == "step_redispatched"
    assert run.events[-1].detail["reason"] == "message_lost"
    assert run.step("s1").status is StepStatus.DISPATCHED


def test_a_message_lost_while_its_owner_ran_it_hands_the_claim_back() -> None:
    run = Run(linear("eng_msg_claimed", 2))
    attempt = run.claim("s1", owner=OWNER)
    other = Owner(OWNER.node, OWNER.boot, OWNER.pid + 1)
    # Another process holds the claim, or nobody knows who had the message: alive.
    assert _message_lost(run, "s1", Phase.FORWARD, attempt, other) is None
    assert _message_lost(run, "s1", Phase.FORWARD, attempt, None) is None
    assert _message_lost(run, "s1", Phase.FORWARD, attempt, OWNER) is not None
    assert (run.step("s1").status, run.step("s1").attempt) == (StepStatus.DISPATCHED, 2)
    assert [e.detail.get("reason") for e in run.events[-1:]] == ["worker_lost"]


def test_a_message_lost_after_its_completion_publishes_what_the_completion_dispatched() -> None:
    defn = (
        Saga("eng_msg_settled")
        .add_step(a, compensate=undo_a)
        .add_step(b, depends_on=["a"])
        .add_step(c, depends_on=["a"])
    )
    run = Run(defn)
    run.succeed("a")  # committed; say its process died before publishing b and c
    run.now += 1
    assert _message_lost(run, "a", Phase.FORWARD, 1, None) is not None
    assert sorted(run.dispatched()) == ["b", "c"]
    assert all(run.dispatch_of(n).attempt == 1 for n in ("b", "c"))
    # A retry still in its backoff is left to the process that holds it (or the sweeper).
    run.fail("b")  # NO retry policy: the saga rolls back, a's compensation is due now
    assert run.step("a").comp_status is CompensationStatus.DISPATCHED
    assert _message_lost(run, "b", Phase.FORWARD, 1, None) is not None
    assert run.dispatched(Phase.COMPENSATE) == ["a"]


def test_a_retry_waiting_for_its_backoff_is_not_published_early() -> None:
    run = Run(Saga("eng_msg_backoff").add_step(a, retry=NO_JITTER))
    run.fail("a")  # attempt 2 due after a 2 s backoff
    assert (run.step("a").status, run.step("a").attempt) == (StepStatus.DISPATCHED, 2)
    assert _message_lost(run, "a", Phase.FORWARD, 1, None) is None
    run.now += 2.5
    assert _message_lost(run, "a", Phase.FORWARD, 1, None) is not None
    assert run.dispatch_of("a").attempt == 2
