"""explore_failures: every step under every fault, checked against the saga invariants."""

from __future__ import annotations

from sagaline.testkit import explore_failures
from sagaline.testkit.explore import FAULT_KINDS
from tests.plugin import shop


def test_a_sound_saga_passes_every_scenario() -> None:
    report = explore_failures(
        shop.order,
        {"amount": 30, "qty": 2},
        world=shop.world,
        reset=shop.reset_world,
        apps=[shop.app],
    )
    report.assert_ok()
    # 3 steps x 4 faults, 2 compensable steps x crash after compensation, and the baseline.
    assert len(report.scenarios) == 1 + 3 * 4 + 2
    statuses = {s.name: s.status for s in report.scenarios}
    assert statuses["permanent failure @ reserve"] == "COMPENSATED"
    assert statuses["duplicate delivery @ charge"] == "COMPLETED"
    assert statuses["crash after compensation @ charge"] == "COMPENSATED"
    assert all(s.fired or s.fault in ("no fault", "permanent failure") for s in report.scenarios)


def test_a_compensation_that_is_not_idempotent_is_caught_by_step_and_scenario() -> None:
    report = explore_failures(
        shop.buggy_order,
        {"amount": 30, "qty": 2},
        world=shop.world,
        reset=shop.reset_world,
        apps=[shop.app],
    )
    assert not report.ok
    bad = [s for s in report.scenarios if not s.ok]
    assert [s.name for s in bad] == ["crash after compensation @ reserve"]
    text = str(report)
    assert "[crash after compensation @ reserve]" in "\n".join(report.violations)
    assert "stock: 5 -> 7" in text
    try:
        report.assert_ok()
    except AssertionError as exc:
        assert "crash after compensation @ reserve" in str(exc)
    else:
        raise AssertionError("assert_ok() passed a broken saga")


def test_an_unknown_fault_kind_is_named() -> None:
    try:
        explore_failures(shop.order, {}, faults=["meteor"], apps=[shop.app])
    except ValueError as exc:
        assert "meteor" in str(exc) and FAULT_KINDS[0] in str(exc)
    else:
        raise AssertionError("accepted an unknown fault kind")


def test_each_invariant_check_can_fail() -> None:
    """The engine never breaks these invariants, so break them by hand in a finished run:
    the checks must see it."""
    from sagaline.records import Event
    from sagaline.states import EventKind, Phase
    from sagaline.testkit import SagaEnv
    from sagaline.testkit.explore import Scenario, _Explorer
    from sagaline.testkit.messages import BodyRun

    explorer = _Explorer(shop.order, {"amount": 30, "qty": 2}, None, None, [shop.app], {})
    with SagaEnv([shop.app]) as env:
        env.mock(shop.ship, raises=RuntimeError("no courier"))
        env.start(shop.order, saga_id=explorer.saga_id, amount=30, qty=2)
        env.run_until_done()
        clean = Scenario("ship", "test")
        explorer._check(env, clean, "ship", "test")
        assert clean.ok, clean.violations
        # reserve undone a second time, after charge (which it depends on) was undone.
        env.store.append_event(
            Event(
                explorer.saga_id,
                EventKind.COMPENSATION_SUCCEEDED,
                env.clock(),
                "reserve",
                2,
                "compensate",
            )
        )
        env.body_runs.append(
            BodyRun(
                explorer.saga_id,
                "charge",
                Phase.FORWARD,
                1,
                f"{explorer.saga_id}:charge",
                "returned",
            )
        )
        env.body_runs.append(
            BodyRun(explorer.saga_id, "ship", Phase.COMPENSATE, 1, "elsewhere", "returned")
        )
        broken = Scenario("ship", "test")
        explorer._check(env, broken, "ship", "test")
    found = "\n".join(broken.violations)
    assert "step 'reserve' applied and was compensated 2 times" in found
    assert "step 'charge' was compensated before step 'reserve'" in found
    assert "step 'charge' applied 2 times with only 0 crash(es)" in found
    assert "the compensation of step 'ship' ran, but the step itself never applied" in found
