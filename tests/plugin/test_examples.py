"""The examples tested the way a user tests their sagas: test files that use only the
plugin (found through its entry point, no conftest), run by pytest in a subprocess."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ORDERS_TESTS = """
import pytest
import sqlalchemy as sa

from examples.orders import services
from examples.orders.app import app  # noqa: F401
from examples.orders.tasks import order_saga, send_confirmation
from sagaline.testkit import assert_compensated, assert_completed, explore_failures


@pytest.fixture(autouse=True)
def shop_database(tmp_path, monkeypatch):
    monkeypatch.setenv("EXAMPLE_DB_URL", f"sqlite:///{tmp_path}/shop.db")


ORDER = {"order_id": "o-1", "amount": 19.99, "sku": "gadget", "quantity": 2}


def shop():
    with services.engine().connect() as conn:
        return {
            "charged": conn.execute(sa.select(services.payments.c.key,
                                              services.payments.c.amount_cents)
                                    .where(services.payments.c.status == "charged")).all(),
            "stock": dict(conn.execute(sa.select(services.stock)).all()),
            "reserved": conn.execute(sa.select(services.reservations.c.key)).all(),
            "emails": conn.execute(sa.select(services.emails.c.key)).all(),
        }


def reset_shop():
    with services.engine().begin() as conn:
        for table in (services.payments, services.reservations, services.emails):
            conn.execute(table.delete())
        for sku, n in services.INITIAL_STOCK.items():
            conn.execute(services.stock.update().where(services.stock.c.sku == sku)
                         .values(available=n))


def test_an_order_is_charged_reserved_and_confirmed(saga_env):
    handle = saga_env.run(order_saga, **ORDER)
    assert assert_completed(handle)["amount_cents"] == 1999
    assert shop()["stock"]["gadget"] == 23 and len(shop()["emails"]) == 1


def test_out_of_stock_refunds_the_payment(saga_env):
    handle = saga_env.run(order_saga, **{**ORDER, "quantity": 999})
    assert_compensated(handle, order=["charge_payment"])
    assert shop()["charged"] == [] and shop()["stock"]["gadget"] == 25


def test_a_failed_confirmation_rolls_back_in_reverse_order(saga_env, mock_step):
    mock_step(send_confirmation, raises=ConnectionError("smtp down"))
    handle = saga_env.run(order_saga, **ORDER)
    assert_compensated(handle, order=["reserve_inventory", "charge_payment"])


def test_every_single_fault_leaves_the_shop_consistent():
    report = explore_failures(order_saga, ORDER, world=shop, reset=reset_shop)
    print(report)
    report.assert_ok()
    assert len(report.scenarios) >= 3 * 4
"""


def readme_test_file() -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Testing your sagas\n(.*?)^## ", text, re.S | re.M)
    assert section is not None, "README has a 'Testing your sagas' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block is not None, "the section has a test file"
    return block.group(1)


@pytest.fixture
def user_project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> pytest.Pytester:
    monkeypatch.setenv("SAGALINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for name in ("SAGALINE_STORE_URL", "CELERY_BROKER_URL", "EXAMPLE_DB_URL"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def test_the_readme_test_file_passes_on_the_robots_example(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_exploration=readme_test_file())
    result = user_project.runpytest_subprocess("-q", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    # explore_failures on the 4-step robots saga: the baseline and 4 x 4 + 4 scenarios.
    result.stdout.fnmatch_lines(
        ["*explore_failures(robot_exploration): 21 scenarios in *, 0 violations"]
    )


def test_the_orders_example_passes_with_the_plugin(user_project: pytest.Pytester) -> None:
    # Its steps publish through sagaline.step_transaction(): a SQL store, each test
    # (and each explore_failures scenario) in a SQLite file of its own.
    user_project.makepyfile(test_orders=ORDERS_TESTS)
    result = user_project.runpytest_subprocess(
        "-q", "-s", "-p", "no:cacheprovider", "--sagaline-store=sqlite"
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*explore_failures(order_saga): * 0 violations"])


def test_the_orders_example_on_the_memory_store_names_the_option_to_pass(
    user_project: pytest.Pytester,
) -> None:
    user_project.makepyfile(test_orders=ORDERS_TESTS)
    result = user_project.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-k", "charged_reserved_and_confirmed"
    )
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(
        ["*step_transaction() needs a SQL saga store*--sagaline-store=sqlite*"]
    )


def test_a_seeded_bug_fails_the_users_test_naming_step_and_scenario(
    user_project: pytest.Pytester,
) -> None:
    user_project.makepyfile(
        test_buggy="""
from sagaline.testkit import explore_failures
from tests.plugin import shop


def test_explore():
    explore_failures(shop.buggy_order, {"amount": 30, "qty": 2}, world=shop.world,
                     reset=shop.reset_world, apps=[shop.app]).assert_ok()
"""
    )
    result = user_project.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*FAIL crash after compensation @ reserve*",
            "*world differs from before the saga*stock: 5 -> 7*",
        ]
    )
