"""saga_env and saga_clock: the real engine in-process, in virtual time."""

from __future__ import annotations

import pytest

from sagaline import SagaStatus
from sagaline.exceptions import InputError
from sagaline.records import SagaFilter
from sagaline.testkit import (
    Faults,
    SagaEnv,
    VirtualClock,
    assert_compensated,
    assert_completed,
    history,
)
from sagaline.testkit.clock import parse_duration
from tests.plugin import shop


def test_a_saga_runs_to_completion_through_the_real_engine(saga_env: SagaEnv) -> None:
    handle = saga_env.start(shop.order, amount=30, qty=2)
    assert handle.status is SagaStatus.RUNNING  # nothing runs until messages are delivered
    delivered = saga_env.run_until_done()
    result = assert_completed(handle)
    assert delivered == 3
    assert result["shipped"] is True and result["reserved"] == 2
    assert shop.WORLD["balance"] == 70 and shop.WORLD["stock"] == 3
    assert history(handle).kinds()[:3] == ["saga_started", "step_dispatched", "step_started"]


def test_step_delivers_one_message_at_a_time(saga_env: SagaEnv) -> None:
    handle = saga_env.start(shop.order, amount=30, qty=2)
    first = saga_env.step()
    assert first is not None and first.message.step == "charge" and first.outcome == "SUCCESS"
    assert [m.step for m in saga_env.queue] == ["reserve"]
    assert shop.WORLD["stock"] == 5
    saga_env.step()
    saga_env.step()
    assert saga_env.step() is None
    assert handle.status is SagaStatus.COMPLETED


def test_messages_carry_json_not_python_objects(saga_env: SagaEnv) -> None:
    saga_env.start(shop.order, amount=30, qty=2)
    saga_env.step()
    msg = saga_env.queue[0]
    assert msg.kwargs == {"qty": 2, "saga_id": msg.meta["saga_id"]}  # filtered, then JSON


def test_duplicate_start_with_an_idempotency_key_returns_the_same_saga(saga_env: SagaEnv) -> None:
    a = saga_env.start(shop.order, idempotency_key="o-1", amount=30, qty=2)
    b = saga_env.start(shop.order, idempotency_key="o-1", amount=30, qty=2)
    saga_env.run_until_done()
    assert a.saga_id == b.saga_id and shop.WORLD["balance"] == 70


def test_a_failed_step_compensates_in_reverse_order(saga_env: SagaEnv, mock_step) -> None:
    mock_step(shop.ship, raises=ValueError("no courier"))
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_compensated(handle, order=["reserve", "charge"])
    assert shop.WORLD["balance"] == 100 and shop.WORLD["stock"] == 5
    with pytest.raises(AssertionError, match="compensated"):
        assert_compensated(handle, order=["charge", "reserve"])
    with pytest.raises(AssertionError, match="not COMPLETED"):
        assert_completed(handle)


def test_retries_wait_in_virtual_time(saga_env: SagaEnv, saga_clock: VirtualClock) -> None:
    handle = saga_env.start(shop.long_saga)
    saga_env.step()  # s0 attempt 1 fails: its retry waits an hour
    assert saga_env.step() is None and saga_env.timers.pending() == 1
    saga_clock.advance("59min")
    assert shop.ATTEMPTS == {"s0": 1}
    saga_clock.advance("1min")  # due now: published and run
    assert shop.ATTEMPTS["s0"] == 2 and shop.ATTEMPTS["s1"] == 1
    assert handle.status is SagaStatus.RUNNING


def test_ten_steps_with_hourly_backoffs_complete_in_virtual_time(
    saga_env: SagaEnv, saga_clock: VirtualClock
) -> None:
    handle = saga_env.run(shop.long_saga)
    assert_completed(handle)
    assert {f"s{i}": 2 for i in range(10)} == shop.ATTEMPTS
    assert saga_clock.elapsed == pytest.approx(10 * 3600)  # ten hours, well inside a day


def test_a_retry_due_after_the_deadline_is_fenced_by_the_rollback(
    saga_env: SagaEnv, saga_clock: VirtualClock
) -> None:
    handle = saga_env.start(shop.long_saga)
    saga_env.step()  # s0 fails once; its retry is due in an hour
    saga_clock.advance("2d", run=False)  # the sweeper sees the deadline at +1d
    kinds = history(handle).kinds()
    assert "saga_deadline_exceeded" in kinds
    saga_env.run_until_done()
    assert handle.status is SagaStatus.COMPENSATED
    assert shop.ATTEMPTS == {"s0": 1}  # the late retry's claim was refused


def test_the_environment_restores_the_apps_runtime() -> None:
    before = shop.app._sagaline_runtime
    with SagaEnv([shop.app]) as env:
        assert shop.app._sagaline_runtime is env.runtime
    assert shop.app._sagaline_runtime is before


@pytest.mark.parametrize(
    ("saga_id", "rule", "message"),
    [
        ("stream", "reserved", "none of counts, stream"),
        ("counts", "reserved", "none of counts, stream"),
        ("orders/7", "reserved", "has no '/'"),
        ("o" * 37, "key", "over the limit of 36"),
    ],
)
def test_a_saga_id_the_api_could_not_address_is_refused_before_anything_is_stored(
    saga_env: SagaEnv, saga_id: str, rule: str, message: str
) -> None:
    with pytest.raises(InputError, match=message) as refused:
        saga_env.start(shop.order, saga_id=saga_id, amount=30, qty=2)
    assert (refused.value.rule, refused.value.where) == (rule, "saga_id")
    assert saga_env.store.list_sagas(SagaFilter(limit=10)) == []
    chosen = saga_env.start(shop.order, saga_id="order-7", amount=30, qty=2)
    assert chosen.saga_id == "order-7"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("90s", 90), ("2h30m", 9000), ("1d", 86400), ("250ms", 0.25), (5, 5)],
)
def test_durations_parse(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1 fortnight", "-1h", "h"])
def test_a_bad_duration_says_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_a_child_saga_runs_in_the_environment_and_is_compensated_with_its_parent(
    saga_env: SagaEnv, mock_step
) -> None:
    done = saga_env.run(shop.fulfilment, amount=10, qty=3)
    assert_completed(done)
    assert shop.WORLD["packed"] == 3
    children = [s for s in saga_env.store.list_sagas(SagaFilter(name="plugin_packing"))]
    assert [c.parent_saga_id for c in children] == [done.saga_id]
    mock_step(shop.notify, raises=RuntimeError("mail down"))
    failed = saga_env.run(shop.fulfilment, amount=10, qty=3)
    assert_compensated(failed, order=["packing", "charge"])
    assert shop.WORLD["packed"] == 3 and shop.WORLD["balance"] == 90  # the first order's


def test_a_step_that_runs_past_its_time_limit_fails_as_a_timeout(
    saga_env: SagaEnv, mock_step
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    mock_step(shop.reserve, raises=SoftTimeLimitExceeded())
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_compensated(handle, order=["charge"])
    failed = history(handle).of("step_failed")
    assert [e.detail["reason"] for e in failed] == ["timeout"]


def test_a_saga_that_waits_for_nothing_is_reported_not_waited_for(
    saga_env: SagaEnv, faults: Faults
) -> None:
    # Every delivery of charge's message is lost: the sweeper sends it again, with a
    # growing backoff, until the run's virtual horizon ends.
    faults.crash("charge", at="before_claim", times=1000)
    saga_env.start(shop.order, amount=30, qty=2)
    with pytest.raises(RuntimeError, match="wait for nothing"):
        saga_env.run_until_done(max_time="1d")
