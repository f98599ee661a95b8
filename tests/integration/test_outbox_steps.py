"""sagaline.step_transaction on real workers: business writes, outbox rows and the step's
completion commit together; crashes before and right after the commit."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

import sagaline
from sagaline.outbox.consumers import RedisStreamConsumer
from sagaline.runtime import Runtime
from sagaline.states import SagaStatus, StepStatus
from sagaline.stores.schema import outbox, sagas
from sagaline.testing import wait_until
from tests.harness import WorkerProcess
from tests.integration import outbox_app
from tests.stores import create_mariadb_database, drop_mariadb_database

pytestmark = pytest.mark.timeout(240)
TOPICS = ("order.debited", "order.audit", "order.refunded")


class Env:
    def __init__(self, runtime: Runtime, engine: sa.Engine, worker: WorkerProcess, streams: str):
        self.runtime, self.engine, self.worker = runtime, engine, worker
        self.streams = redis.Redis.from_url(streams, decode_responses=True)

    def run(self, order_id: str, **kw: object) -> sagaline.SagaHandle:
        return self.runtime.start_saga(outbox_app.pay, {"order_id": order_id, "amount": 5, **kw})

    def count(self, table: sa.Table, order_id: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.order_id == order_id)
                ).scalar_one()
            )

    def pending(self, saga_id: str) -> dict[str, tuple[str, str | None]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox.c.event_id, outbox.c.topic, outbox.c.key).where(
                    outbox.c.event_id.like(f"{saga_id}:%")
                )
            )
            return {r.event_id: (r.topic, r.key) for r in rows}

    def sent(self, saga_id: str) -> dict[str, tuple[str, str | None]]:
        found = {}
        for topic in TOPICS:
            for _, f in self.streams.xrange(topic):
                if f["id"].startswith(f"{saga_id}:"):
                    found[f["id"]] = (f["topic"], f["key"] or None)
        return found

    def events(self, saga_id: str) -> dict[str, tuple[str, str | None]]:
        """Every event of the saga: still in the outbox, or sent."""
        return {**self.pending(saga_id), **self.sent(saga_id)}


@pytest.fixture(scope="module", params=["postgres", "sqlite", "mariadb"])
def env(
    request: pytest.FixtureRequest,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("outbox-home")
    crash_dir = home / "crash"
    crash_dir.mkdir()
    if request.param == "postgres":
        store, broker = pg_url, redis_url
    elif request.param == "mariadb":
        store, broker = create_mariadb_database(), redis_url
    else:  # the embedded defaults: SQLite store, filesystem broker
        store, broker = f"sqlite:///{home}/state.db", ""
        os.environ["SAGALINE_HOME"] = str(home)
    client = Celery("outbox-client")
    client.conf.broker_url = broker or None
    runtime = sagaline.init_app(client, store=store, sweeper=False, lease=3, redispatch_after=3)
    runtime.store.migrate()
    engine = sa.create_engine(store.replace("postgresql://", "postgresql+psycopg://", 1))
    outbox_app.metadata.create_all(engine)
    streams = (
        redis_url.rsplit("/", 1)[0]
        + {"postgres": "/11", "sqlite": "/10", "mariadb": "/8"}[request.param]
    )
    redis.Redis.from_url(streams).flushdb()
    env_vars = {
        "SAGALINE_STORE_URL": store,
        "CELERY_BROKER_URL": broker,
        "SAGALINE_HOME": str(home),
        "SAGALINE_SWEEP_INTERVAL": "1",
        "SAGALINE_LEASE": "3",
        "SAGALINE_REDISPATCH_AFTER": "3",
        "CRASH_DIR": str(crash_dir),
        # Events go to Redis Streams (one per topic). No relay: what arrives
        # was sent by the committing process right after its commit.
        "SAGALINE_OUTBOX_ROUTES": f"order.*={streams}",
        "SAGALINE_OUTBOX_RELAY": "false",
    }
    worker = WorkerProcess(
        "tests.integration.outbox_app", env=env_vars, concurrency=2, workdir=Path(home) / "worker"
    )
    worker.start()
    try:
        yield Env(runtime, engine, worker, streams)
    finally:
        worker.stop()
        runtime.store.close()
        engine.dispose()
        os.environ.pop("SAGALINE_HOME", None)
        if request.param == "mariadb":
            drop_mariadb_database(store)


def test_writes_events_and_completion_commit_together(env: Env) -> None:
    h = env.run("o-ok")
    assert h.get(timeout=60) is not None
    assert env.count(outbox_app.payments, "o-ok") == 1
    sid = h.saga_id
    assert env.events(sid) == {
        f"{sid}:debit:1": ("order.debited", "o-ok"),
        f"{sid}:debit:2": ("order.audit", None),
    }
    steps = {s.name: s for s in env.runtime.store.get_steps(sid)}
    assert steps["debit"].status is StepStatus.SUCCEEDED
    assert steps["debit"].output == {"debited": 5}


def test_the_committing_process_sends_the_events_at_once(env: Env) -> None:
    h = env.run("o-sent")
    h.get(timeout=60)
    sid = h.saga_id
    # The stream gets the events before the sender's delete of their outbox rows
    # commits: wait for both.
    wait_until(
        lambda: len(env.sent(sid)) == 2 and not env.pending(sid),
        timeout=20,
        what="both events sent and gone from the outbox",
    )
    assert env.sent(sid) == {
        f"{sid}:debit:1": ("order.debited", "o-sent"),
        f"{sid}:debit:2": ("order.audit", None),
    }


def test_a_failure_inside_the_block_leaves_nothing(env: Env) -> None:
    h = env.run("o-fail", fail_inside=True)
    with pytest.raises(sagaline.SagaError):
        h.get(timeout=60)
    assert env.count(outbox_app.payments, "o-fail") == 0
    assert env.events(h.saga_id) == {}


def test_a_compensation_writes_and_publishes_in_its_own_transaction(env: Env) -> None:
    h = env.run("o-comp", fail_ship=True)
    with pytest.raises(sagaline.SagaCompensated):
        h.get(timeout=60)
    sid = h.saga_id
    assert env.count(outbox_app.payments, "o-comp") == 1
    assert env.count(outbox_app.refunds, "o-comp") == 1
    assert env.events(sid)[f"{sid}:debit:compensate:1"] == ("order.refunded", "o-comp")


@pytest.mark.parametrize("when", ["before_commit", "after_commit"])
def test_a_worker_killed_around_the_commit_writes_once(env: Env, when: str) -> None:
    order = f"o-crash-{when}"
    h = env.run(order, crash=when)
    h.get(timeout=90)
    assert h.status is SagaStatus.COMPLETED
    assert env.count(outbox_app.payments, order) == 1
    sid = h.saga_id
    assert set(env.events(sid)) == {f"{sid}:debit:1", f"{sid}:debit:2"}
    assert (Path(env.worker.env["CRASH_DIR"]) / f"{order}.{when}").exists()


def test_an_event_started_saga_runs_once_despite_1000_redeliveries(
    env: Env, redis_url: str
) -> None:
    """The event arrives 1,001 times on a Redis stream (the relay's send plus 1,000
    injected copies); start_on's idempotency key makes one saga, which runs once."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    order = f"o-event-{uuid.uuid4().hex[:8]}"
    entry = {
        "id": f"evt-{order}",
        "topic": "order.placed",
        "key": order,
        "payload": json.dumps({"order_id": order, "amount": 7}),
        "headers": "{}",
    }
    pipe = client.pipeline(transaction=False)
    for _ in range(1001):
        pipe.xadd("placed", entry)  # type: ignore[arg-type]
    pipe.execute()
    handles: list[sagaline.SagaHandle | None] = []
    start = sagaline.start_on("order.*", outbox_app.pay, runtime=env.runtime)
    consumer = RedisStreamConsumer(url, "placed", "starter", lambda e: handles.append(start(e)))
    stop = threading.Event()
    t = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_until(lambda: len(handles) == 1001, timeout=60, what="1,001 deliveries")
    finally:
        stop.set()
        t.join(10)
    ids = {h.saga_id for h in handles if h is not None}
    assert len(ids) == 1
    [h] = [h for h in handles[:1] if h is not None]
    h.get(timeout=60)
    assert env.count(outbox_app.payments, order) == 1
    with env.engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count())
            .select_from(sagas)
            .where(sagas.c.idempotency_key == f"evt-{order}")
        ).scalar_one()
    assert n == 1


# A deferred constraint (checked at commit) needs PostgreSQL: this case runs there only.
@pytest.mark.parametrize("env", ["postgres"], indirect=True)
def test_a_commit_that_fails_fails_the_attempt_and_is_retried(env: Env) -> None:
    assert env.engine.dialect.name == "postgresql"
    with env.engine.begin() as conn:
        conn.execute(sa.text(outbox_app.DEFERRED_DDL))
    h = env.runtime.start_saga(outbox_app.commit_fails, {"order_id": "o-deferred"})
    with pytest.raises(sagaline.SagaError) as err:
        h.get(timeout=60)
    assert "biz_deferred_once" in str(err.value) or "UniqueViolation" in str(err.value)
    [rec] = env.runtime.store.get_steps(h.saga_id)
    assert rec.status is StepStatus.FAILED and rec.attempt == 2
    assert env.events(h.saga_id) == {}
