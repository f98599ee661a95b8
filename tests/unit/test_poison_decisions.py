"""Pure decisions for undeliverable messages, and storable failure text: no servers."""

from __future__ import annotations

from sagaline import recovery
from sagaline.records import Event
from sagaline.states import CompensationStatus, Phase, SagaStatus, StepStatus
from sagaline.stores.sanitize import CUT_MARKER, MAX_TEXT, storable_text, storable_value
from tests.unit.test_engine import Run, linear


def undeliverable(
    run: Run, step: str, phase: Phase = Phase.FORWARD, attempt: int | None = None
) -> object:
    rec = run.step(step)
    return run.apply(
        recovery.undeliverable(
            run.defn,
            run.snapshot(),
            step,
            phase,
            rec.attempt_for(phase) if attempt is None else attempt,
            reason="message_unsendable",
            error="message not sent: TypeError: no",
            now=run.now,
            timing=run.timing,
        )
    )


def test_an_undeliverable_step_fails_without_running_and_rollback_starts_at_once() -> None:
    run = Run(linear("undeliverable_forward"))
    run.succeed("s1", {"a": 1})
    assert run.step("s2").status is StepStatus.DISPATCHED
    undeliverable(run, "s2")
    assert run.step("s2").status is StepStatus.FAILED
    assert run.step("s2").error == "message not sent: TypeError: no"
    assert run.status is SagaStatus.COMPENSATING
    assert run.dispatched(Phase.COMPENSATE) == ["s1"]
    [failed] = [e for e in run.events if e.kind == "step_failed"]
    assert failed.detail["reason"] == "message_unsendable" and failed.detail["permanent"]


def test_an_undeliverable_compensation_parks_the_saga_failed() -> None:
    run = Run(linear("undeliverable_compensation"))
    run.succeed("s1", {"a": 1})
    run.fail("s2", permanent=True)
    undeliverable(run, "s1", Phase.COMPENSATE)
    assert run.step("s1").comp_status is CompensationStatus.COMPENSATION_FAILED
    assert run.status is SagaStatus.FAILED
    assert run.events[-1].detail["compensation_failed"] == ["s1"]


def test_an_undeliverable_copy_of_an_older_attempt_decides_nothing() -> None:
    run = Run(linear("undeliverable_stale"))
    run.succeed("s1", {"a": 1})
    assert (
        recovery.undeliverable(
            run.defn,
            run.snapshot(),
            "s2",
            Phase.FORWARD,
            7,
            reason="r",
            error="e",
            now=run.now,
            timing=run.timing,
        )
        is None
    )
    run.claim("s2")  # running now: a late undecodable copy must not fail it
    assert (
        recovery.undeliverable(
            run.defn,
            run.snapshot(),
            "s2",
            Phase.FORWARD,
            1,
            reason="r",
            error="e",
            now=run.now,
            timing=run.timing,
        )
        is None
    )


def test_an_unregistered_task_is_offered_again_then_fails_the_step() -> None:
    run = Run(linear("unregistered"))
    refusal = Event(
        "saga-1",
        "task_unregistered",
        run.now,
        "s1",
        1,
        "forward",
        {"task": "engine_test.s1", "worker": "w1@host"},
    )
    decision = run.apply(
        recovery.unregistered_task(
            run.defn,
            run.snapshot(),
            refusal,
            Phase.FORWARD,
            max_redispatches=1,
            now=run.now,
            timing=run.timing,
        )
    )
    assert decision is not None and decision.events == [refusal]
    assert run.step("s1").status is StepStatus.DISPATCHED
    assert run.step("s1").due_at == run.now + run.timing.redispatch_after
    run.now += 40
    run.redispatch("s1")
    assert run.step("s1").redispatches == 1
    run.apply(
        recovery.unregistered_task(
            run.defn,
            run.snapshot(),
            refusal,
            Phase.FORWARD,
            max_redispatches=1,
            now=run.now,
            timing=run.timing,
        )
    )
    assert run.step("s1").status is StepStatus.FAILED
    assert "no worker has task 'engine_test.s1' registered" in (run.step("s1").error or "")
    assert run.status is SagaStatus.COMPENSATED  # nothing was applied


def test_storable_text_escapes_what_drivers_refuse_and_cuts_visibly() -> None:
    assert storable_text("a\x00b") == "a\\x00b"
    assert storable_text("x\ud800y") == "x\\ud800y"
    assert storable_text("ünïcode ✓ 🚀") == "ünïcode ✓ 🚀"
    long = "h" * 10 + "m" * 100_000 + "t" * 10
    cut = storable_text(long)
    assert len(cut) <= MAX_TEXT and cut.startswith("h" * 10) and cut.endswith("t" * 10)
    assert "characters cut by sagaline" in cut and CUT_MARKER.split("{")[0] in cut
    assert len(storable_text("z" * MAX_TEXT)) == MAX_TEXT
    assert storable_value({"k\x00": ["\ud800", 1, None]}) == {"k\\x00": ["\\ud800", 1, None]}
