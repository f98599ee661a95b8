"""--sagaline-store: the same user tests on every store, each test isolated and cleaned."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.private_postgres import SHARED_PG_HOST, SHARED_PG_PORT, SHARED_PG_USER
from tests.stores import redis_test_url

ROOT = Path(__file__).resolve().parents[2]

USER_TESTS = """
from sagaline.testkit import assert_compensated, assert_completed, history
from tests.plugin import shop


def where(store):
    return f"STORE {type(store).__name__} {getattr(store, 'prefix', '')} {store.url}"


def test_crashes_and_lost_messages_still_complete(saga_env, faults):
    shop.reset_world()
    faults.crash("charge", at="after_body")
    faults.lose_message("reserve")
    faults.duplicate("ship")
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_completed(handle)
    assert shop.WORLD["balance"] == 70
    print(where(saga_env.store))


def test_a_failure_compensates_through_failing_compensations(saga_env, mock_step, faults):
    shop.reset_world()
    mock_step(shop.ship, raises=ValueError("no courier"))
    faults.fail_compensation("charge", times=2)
    handle = saga_env.run(shop.order, amount=30, qty=2)
    assert_compensated(handle, order=["reserve", "charge"])
    print(where(saga_env.store))


def test_hourly_retries_in_virtual_time(saga_env, saga_clock):
    shop.ATTEMPTS.clear()
    assert_completed(saga_env.run(shop.long_saga))
    assert saga_clock.elapsed == 36000
    # Each test has a store of its own: only this test's saga is in it.
    assert saga_env.unfinished() == [] and len(history(saga_env.start(shop.order,
        amount=1, qty=1)).kinds()) > 0
    print(where(saga_env.store))
"""


def pg_server() -> str:
    return f"postgresql://{SHARED_PG_USER}@{SHARED_PG_HOST}:{SHARED_PG_PORT}/postgres"


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgresql", "redis", "redis-cluster"])
def test_the_same_user_tests_pass_on_every_store_and_leave_nothing_behind(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    if store == "redis-cluster":  # the session's private cluster, started only if asked
        option = str(request.getfixturevalue("redis_cluster_url"))
    else:
        option = {
            "memory": "memory",
            "sqlite": "sqlite",
            "postgresql": pg_server(),
            "redis": redis_test_url(),
        }[store]
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(
        "-q", "-s", "-p", "no:cacheprovider", f"--sagaline-store={option}"
    )
    result.assert_outcomes(passed=3)
    used = re.findall(r"STORE (\w+) (\S*) ?(\S+)", result.stdout.str())
    assert len(used) == 3
    kinds = {u[0] for u in used}
    assert kinds == {
        {
            "memory": "MemoryStore",
            "sqlite": "SQLStore",
            "postgresql": "SQLStore",
            "redis": "RedisStore",
            "redis-cluster": "RedisStore",
        }[store]
    }
    places = {u[1] if store.startswith("redis") else u[2] for u in used}
    if store != "memory":  # (a memory store is a new object per test)
        assert len(places) == 3, f"tests shared a store: {used}"  # one each
    if store == "postgresql":
        import psycopg

        names = [p.rsplit("/", 1)[-1] for p in places]
        with psycopg.connect(
            host=SHARED_PG_HOST,
            port=SHARED_PG_PORT,
            user=SHARED_PG_USER,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            left = conn.execute(
                "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,)
            ).fetchall()
        assert left == []
    if store.startswith("redis"):
        import redis

        client: Any = (
            redis.Redis.from_url(redis_test_url())
            if store == "redis"
            else redis.RedisCluster.from_url(option.replace("redis+cluster:", "redis:", 1))
        )
        try:
            assert all(not list(client.scan_iter(match=f"{p}:*")) for p in places)
            assert all(p.startswith("sagaline-plugin-") for p in places)
        finally:
            client.close()


def test_an_unknown_store_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest_subprocess("--sagaline-store=mongodb://x", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--sagaline-store='mongodb://x': use one of memory, sqlite*"])
