"""Faults and mocks in saga_env: each leads the real engine and sweeper where a real
crash, duplicate or lost message would."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaline import SagaStatus
from sagaline.testkit import Faults, SagaEnv, VirtualClock, assert_compensated, assert_completed
from sagaline.testkit import history as saga_history
from tests.plugin import shop


def forward_runs(env: SagaEnv, step: str) -> list[str]:
    return [r.outcome for r in env.body_runs if r.step == step and r.phase.value == "forward"]


def test_a_duplicate_message_is_fenced_by_the_claim(saga_env: SagaEnv, faults: Faults) -> None:
    faults.duplicate(shop.charge)
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_completed(handle)
    assert [d.outcome for d in saga_env.deliveries][:2] == ["SUCCESS", "IGNORED"]
    assert forward_runs(saga_env, "charge") == ["returned"]


def test_a_lost_message_is_published_again_by_the_sweeper(
    saga_env: SagaEnv, faults: Faults, saga_clock: VirtualClock
) -> None:
    faults.lose_message("reserve")
    handle = saga_env.start(shop.order, amount=30, qty=2)
    saga_env.step()
    assert saga_env.step() is None  # reserve's message never reached the broker
    saga_clock.advance("29s")
    assert handle.status is SagaStatus.RUNNING
    saga_clock.advance("1s")  # redispatch_after (30 s) passed: the sweeper sends it again
    assert_completed(handle)
    assert "step_redispatched" in saga_history(handle).kinds()


def test_a_crash_after_the_body_reruns_the_step_with_the_same_key(
    saga_env: SagaEnv, faults: Faults
) -> None:
    faults.crash(shop.charge, at="after_body")
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_completed(handle)
    assert forward_runs(saga_env, "charge") == ["crashed", "returned"]
    keys = {r.idempotency_key for r in saga_env.body_runs if r.step == "charge"}
    assert keys == {f"{handle.saga_id}:charge"}
    assert shop.WORLD["balance"] == 70  # charged once: the key made the re-run harmless
    reasons = [e.detail.get("reason") for e in saga_history(handle).of("step_attempt_failed")]
    assert reasons == ["lease_expired"]


def test_a_crash_before_the_claim_leaves_the_step_to_the_sweeper(
    saga_env: SagaEnv, faults: Faults
) -> None:
    faults.crash("charge", at="before_claim")
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_completed(handle)
    assert forward_runs(saga_env, "charge") == ["returned"]
    assert saga_env.deliveries[0].outcome == "crashed"


def test_an_expired_lease_retries_and_fences_the_late_completion(
    saga_env: SagaEnv, faults: Faults
) -> None:
    faults.expire_lease("reserve")
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_completed(handle)
    assert forward_runs(saga_env, "reserve") == ["returned", "returned"]
    assert shop.WORLD["stock"] == 3


def test_a_failing_compensation_is_retried_until_it_succeeds(
    saga_env: SagaEnv, faults: Faults, mock_step
) -> None:
    mock_step(shop.ship, raises=RuntimeError("courier refused"))
    faults.fail_compensation("charge", times=2)
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_compensated(handle, order=["reserve", "charge"])
    assert saga_history(handle).kinds().count("compensation_attempt_failed") == 2
    assert shop.WORLD["balance"] == 100


def test_sweep_runs_the_real_sweepers_decisions(
    saga_env: SagaEnv, faults: Faults, saga_clock: VirtualClock
) -> None:
    faults.crash("charge", at="after_body")
    handle = saga_env.start(shop.order, amount=30, qty=2)
    saga_env.step()
    assert saga_env.sweep().acted == 0  # the lease still runs
    saga_clock.advance("61s", run=False)
    assert handle.status is SagaStatus.RUNNING
    # The sweeper took the attempt as crashed; its retry waits out a short backoff.
    failed = saga_history(handle).of("step_attempt_failed")
    assert [e.detail["reason"] for e in failed] == ["lease_expired"]
    assert len(saga_env.queue) + saga_env.timers.pending() == 1
    saga_env.run_until_done()
    assert_completed(handle)


def test_mock_step_returns_records_and_sequences(saga_env: SagaEnv, mock_step) -> None:
    charge = mock_step(shop.charge, returns={"charge": "fake"})
    ship = mock_step(shop.ship, side_effect=[ConnectionError("flaky")])
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert charge.call_count == 1 and charge.calls[0]["amount"] == 30
    assert ship.call_count == 1
    assert_compensated(handle, order=["reserve", "charge"])
    assert shop.WORLD["balance"] == 100


def test_mock_step_works_for_compensations(saga_env: SagaEnv, mock_step) -> None:
    mock_step(shop.ship, raises=ValueError("no"))
    refund = mock_step(shop.refund, side_effect=lambda **kw: None)
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_compensated(handle)
    assert refund.call_count == 1
    assert refund.calls[0]["compensation_data"]["amount"] == 30
    assert shop.WORLD["balance"] == 70  # the mock refunded nothing


def test_mock_step_takes_one_behaviour() -> None:
    from sagaline.testkit import StepMock

    with pytest.raises(ValueError, match="one of"):
        StepMock("t", returns=1, raises=ValueError())


def test_a_bad_crash_point_is_named() -> None:
    with pytest.raises(ValueError, match="before_claim"):
        Faults().crash("x", at="midway")


def test_the_timeline_snapshot_is_the_same_on_every_run(saga_env: SagaEnv, faults: Faults) -> None:
    faults.crash("charge", at="after_body")
    handle = saga_env.run(shop.order, amount=30, qty=2)
    text = saga_history(handle).snapshot()
    assert handle.saga_id not in text
    with SagaEnv([shop.app], faults=Faults()) as again:
        again.faults.crash("charge", at="after_body")
        shop.reset_world()
        other = again.run(shop.order, amount=30, qty=2)
        assert saga_history(other).snapshot() == text
    assert text.splitlines()[0] == "+       0s saga_started name=plugin_order"
    assert "step_attempt_failed charge #1" in text


GOLDEN = Path(__file__).parent / "golden" / "order_crash_then_refused_courier.txt"


def test_the_timeline_matches_its_golden_file(saga_env: SagaEnv, faults: Faults, mock_step) -> None:
    faults.crash("charge", at="after_body")
    mock_step(shop.ship, side_effect=[ConnectionError("courier busy")])
    handle = saga_env.run(shop.order, amount=30, qty=2)
    text = saga_history(handle).snapshot()
    # Virtual time and seeded jitter: the same text on every run, to the millisecond.
    assert text == GOLDEN.read_text()
