"""The outbox and inbox writers on SQLite, and step_transaction's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

import sagaline
from sagaline.context import StepInfo
from sagaline.exceptions import ConfigurationError, InputError
from sagaline.outbox import step as step_tx
from sagaline.states import Phase
from sagaline.stores.schema import outbox, outbox_keys
from sagaline.stores.sql import SQLStore


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    url = f"sqlite:///{tmp_path}/state.db"
    SQLStore(url).migrate()
    return sa.create_engine(url)


def test_publish_commits_with_the_transaction_and_not_without(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        eid = sagaline.outbox.publish(conn, "order.created", {"n": 1}, key="o1")
    with pytest.raises(ZeroDivisionError), engine.begin() as conn:
        sagaline.outbox.publish(conn, "order.created", {"n": 2}, key="o1", event_id="gone")
        raise ZeroDivisionError
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.event_id, outbox.c.payload)).all()
        bumped = conn.execute(sa.select(sa.func.sum(outbox_keys.c.n))).scalar_one()
    assert rows == [(eid, {"n": 1})]
    assert bumped == 1  # the key's lock row was taken once (the rolled back one undone)


def test_publish_refuses_bad_input(engine: sa.Engine) -> None:
    with engine.connect() as conn, pytest.raises(InputError, match="inside a transaction"):
        sagaline.outbox.publish(conn.execution_options(), "t", {})
    with engine.begin() as conn:
        with pytest.raises(InputError, match="not JSON"):
            sagaline.outbox.publish(conn, "t", {"x": object()})
        with pytest.raises(InputError, match="headers"):
            sagaline.outbox.publish(conn, "t", {}, headers={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(InputError, match="topic"):
            sagaline.outbox.publish(conn, "", {})
    with pytest.raises(TypeError, match="Connection or Session"):
        sagaline.outbox.publish("sqlite://", "t", {})


def test_inbox_records_each_message_once_per_consumer(engine: sa.Engine) -> None:
    seen = []
    for consumer, mid in [
        ("billing", "m1"),
        ("billing", "m1"),
        ("shipping", "m1"),
        ("billing", "m2"),
    ]:
        with (
            engine.begin() as conn,
            sagaline.inbox.receive(conn, consumer=consumer, message_id=mid) as fresh,
        ):
            seen.append(fresh)
    assert seen == [True, False, True, True]
    # A handler that rolls back leaves the message unrecorded: it is fresh again.
    with (
        pytest.raises(ZeroDivisionError),
        engine.begin() as conn,
        sagaline.inbox.receive(conn, consumer="billing", message_id="m3") as fresh,
    ):
        assert fresh
        raise ZeroDivisionError
    with (
        engine.begin() as conn,
        sagaline.inbox.receive(conn, consumer="billing", message_id="m3") as fresh,
    ):
        assert fresh


def test_step_transaction_outside_a_step_says_where_it_belongs() -> None:
    with pytest.raises(RuntimeError, match="body of a saga step"), sagaline.step_transaction():
        pass


def test_step_transaction_on_a_store_that_cannot_join_refuses() -> None:
    app = Celery("refuse")
    runtime = sagaline.init_app(app, store="memory://", sweeper=False)
    token = step_tx.enter(runtime, StepInfo("s", "n", "step", 1, Phase.FORWARD))
    try:
        with (
            pytest.raises(ConfigurationError, match="cannot take part in a SQL transaction"),
            sagaline.step_transaction(),
        ):
            pass
    finally:
        step_tx.leave(token)


def test_step_transaction_refuses_tables_in_another_database(tmp_path: Path) -> None:
    app = Celery("other-db")
    store_url = f"sqlite:///{tmp_path}/store.db"
    runtime = sagaline.init_app(app, store=store_url, sweeper=False)
    runtime.store.migrate()
    token = step_tx.enter(runtime, StepInfo("s", "n", "step", 1, Phase.FORWARD))
    try:
        with (
            pytest.raises(ConfigurationError, match="cannot span two databases"),
            sagaline.step_transaction(database=f"sqlite:///{tmp_path}/mine.db"),
        ):
            pass
        with sagaline.step_transaction(database=sa.create_engine(store_url)) as tx:
            assert tx.connection.engine.url.database.endswith("store.db")
    finally:
        step_tx.leave(token)
        runtime.store.close()


RELAY_ORDER = """
import sys
from celery import Celery
import sagaline
app = Celery("relay_order", broker="memory://", set_as_current=False)
sagaline.init_app(app, store=sys.argv[1], outbox_routes="order.*=redis://127.0.0.1:1/0")
worker = app.WorkController(concurrency=1, pool_cls="prefork", hostname="order@test")
print(" ".join(step.name for step in worker.blueprint.order))
"""


@pytest.mark.parametrize("hash_seed", ["0", "1", "2", "3"])
def test_the_relay_bootstep_starts_after_the_pool_forked(hash_seed: str, tmp_path: Path) -> None:
    # A pool process forked while the relay's thread held a lock (a module it imports,
    # a metric it creates) would hang at its first use of it. Without a `requires`, the
    # order of the bootsteps follows set iteration, so it changes with the hash seed.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", RELAY_ORDER, f"sqlite:///{tmp_path}/state.db"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout.split()
    assert out.index("sagaline.outbox.worker.RelayStep") > out.index(
        "celery.worker.components.Pool"
    ), out
