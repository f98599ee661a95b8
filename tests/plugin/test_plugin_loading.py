"""Loading the plugin: through its entry point, cheaply, and with no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_entry_point_names_the_plugin() -> None:
    from importlib.metadata import entry_points

    found = [e.value for e in entry_points(group="pytest11") if e.name == "sagaline"]
    assert found == ["sagaline.pytest_plugin"]


def test_loading_the_plugin_imports_neither_celery_nor_a_store_driver() -> None:
    code = (
        "import sys, time, pytest\n"
        "t = time.perf_counter()\n"
        "import sagaline.pytest_plugin\n"
        "print(round((time.perf_counter() - t) * 1000, 1))\n"
        "print(sorted(m for m in ('celery', 'kombu', 'sqlalchemy', 'redis', 'psycopg',"
        " 'sagaline.runtime', 'sagaline.testkit') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split("\n")
    assert out[1] == "[]", out  # (the milliseconds, out[0], are reported by bench/plugin.py)


NO_NETWORK_CONFTEST = """
import socket

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
"""

NO_NETWORK_TESTS = """
import socket

import pytest

from sagaline.testkit import assert_compensated, assert_completed, explore_failures
from tests.plugin import shop


def test_the_guard_works():
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


def test_a_saga_with_faults_runs_without_the_network(saga_env, faults, saga_clock):
    shop.reset_world()
    faults.crash("charge", at="after_body")
    faults.lose_message("reserve")
    assert_completed(saga_env.run(shop.order, amount=30, qty=2))
    assert_completed(saga_env.run(shop.long_saga))


def test_explore_failures_runs_without_the_network():
    explore_failures(shop.order, {"amount": 30, "qty": 2}, world=shop.world,
                     reset=shop.reset_world, apps=[shop.app]).assert_ok()
"""


def test_saga_env_makes_no_network_access(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(NO_NETWORK_CONFTEST)
    pytester.makepyfile(test_offline=NO_NETWORK_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
