"""The outbox relay on PostgreSQL: key order, late commits, dead letters, every destination."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from typer.testing import CliRunner

import sagaline
from sagaline.cli import cli
from sagaline.outbox.consumers import InboxHandler, RabbitMQConsumer, RedisStreamConsumer
from sagaline.outbox.destinations import OutboxEvent, open_destination
from sagaline.outbox.relay import Relay
from sagaline.stores.schema import outbox
from sagaline.stores.sql import SQLStore
from sagaline.testing import wait_until
from tests.harness import WorkerProcess, drop_database, rabbitmq_vhost, shared_postgres_url
from tests.private_nats import PrivateNats
from tests.stores import create_mariadb_database, drop_mariadb_database

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_outbox_{uuid.uuid4().hex[:10]}")
    SQLStore(url).migrate()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(params=["postgres", "mariadb"])
def any_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """PostgreSQL (LISTEN/NOTIFY) and MariaDB (polling), both with SKIP LOCKED."""
    if request.param == "postgres":
        url = shared_postgres_url(f"sagaline_outbox_{uuid.uuid4().hex[:10]}")
        drop = drop_database
    else:
        url, drop = create_mariadb_database(), drop_mariadb_database
    SQLStore(url).migrate()
    try:
        yield url
    finally:
        drop(url)


@pytest.fixture
def stream_url(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(url).flushdb()
    return url


def publish_many(
    url: str, events: list[tuple[str, dict[str, Any]]], topic: str = "t.e"
) -> list[str]:
    engine = sa.create_engine(url)
    ids = []
    with engine.begin() as conn:
        for key, payload in events:
            ids.append(sagaline.outbox.publish(conn, topic, payload, key=key))
    engine.dispose()
    return ids


def pending(url: str) -> list[Any]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox)).all()
    engine.dispose()
    return rows


def running(relay: Relay) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    return stop, t


def stop_relay(relay: Relay, stop: threading.Event, t: threading.Thread) -> None:
    stop.set()
    t.join(10)
    relay.close()


def stream_events(url: str, stream: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    return [fields for _, fields in client.xrange(stream)]


def test_keys_in_order_and_a_late_commit_is_not_skipped(any_db: str, stream_url: str) -> None:
    db = any_db
    engine = sa.create_engine(db)
    late = engine.connect()
    late_tx = late.begin()
    # Takes an id below every row committed after it, and commits last.
    late_id = sagaline.outbox.publish(late, "t.e", {"late": True}, key="late-key")
    publish_many(db, [(f"k{i % 5}", {"n": i}) for i in range(50)])
    relay = Relay(db, f"t.*={stream_url}?stream=s1", batch=7)
    stop, t = running(relay)
    try:
        wait_until(
            lambda: len(stream_events(stream_url, "s1")) == 50,
            timeout=30,
            what="the first 50 events",
        )
        late_tx.commit()
        wait_until(
            lambda: len(stream_events(stream_url, "s1")) == 51, timeout=30, what="the late event"
        )
    finally:
        stop_relay(relay, stop, t)
        late.close()
        engine.dispose()
    got = stream_events(stream_url, "s1")
    assert got[-1]["id"] == late_id
    for k in range(5):
        ns = [json.loads(e["payload"])["n"] for e in got if e["key"] == f"k{k}"]
        assert ns == sorted(ns) and len(ns) == 10
    assert pending(db) == []


def test_two_relays_keep_each_keys_order(any_db: str, stream_url: str) -> None:
    db = any_db
    publish_many(db, [(f"k{i % 10}", {"n": i}) for i in range(300)])
    relays = [Relay(db, f"*={stream_url}?stream=s2", batch=5) for _ in range(2)]
    runs = [running(r) for r in relays]
    try:
        wait_until(
            lambda: len(stream_events(stream_url, "s2")) >= 300, timeout=60, what="300 events"
        )
    finally:
        for r, (stop, t) in zip(relays, runs, strict=True):
            stop_relay(r, stop, t)
    got = stream_events(stream_url, "s2")
    assert len({e["id"] for e in got}) == 300
    for k in range(10):
        ns = [json.loads(e["payload"])["n"] for e in got if e["key"] == f"k{k}"]
        assert ns == sorted(ns), f"key k{k} out of order"


def test_failures_back_off_then_dead_letters_then_retry(any_db: str, stream_url: str) -> None:
    db = any_db
    ids = publish_many(db, [("a", {"n": 1}), ("a", {"n": 2})], topic="x.e")
    [unrouted] = publish_many(db, [(None, {"n": 3})], topic="nowhere")  # type: ignore[list-item]
    from prometheus_client import REGISTRY

    dead_before = REGISTRY.get_sample_value("sagaline_outbox_dead_letters_total") or 0.0
    closed = f"redis://127.0.0.1:{_closed_port()}/0"
    bad = Relay(db, f"x.*={closed}", max_attempts=3, backoff=0.01)
    for _ in range(3):
        bad.deliver_once()
        time.sleep(0.05)
    bad.close()
    rows = {r.event_id: r for r in pending(db)}
    assert rows[ids[0]].status == "dead" and rows[ids[0]].attempts == 3
    assert "ConnectionError" in rows[ids[0]].last_error
    assert rows[ids[1]].status == "pending" and rows[ids[1]].attempts == 0  # behind its head
    assert rows[unrouted].status == "dead" and "no outbox route" in rows[unrouted].last_error
    assert REGISTRY.get_sample_value("sagaline_outbox_dead_letters_total") == dead_before + 2
    runner = CliRunner()
    out = runner.invoke(cli, ["outbox", "ls", "--dead", "--store", db])
    assert out.exit_code == 0, out.output
    assert ids[0] in out.output and "2 dead letter(s)" in out.output
    out = runner.invoke(cli, ["outbox", "retry", ids[0], "--store", db])
    assert "1 dead letter(s) pending again" in out.output
    good = Relay(db, f"x.*={stream_url}?stream=s3")
    assert good.deliver_once() == 1  # the head of "a" (the unrouted row stays dead)
    assert good.deliver_once() == 1
    good.close()
    assert [e["id"] for e in stream_events(stream_url, "s3")] == ids
    assert [r.event_id for r in pending(db)] == [unrouted]


def _closed_port() -> int:
    from sagaline.testing import free_port

    return free_port()


def test_rabbitmq_with_confirms_and_an_inbox_consumer(db: str) -> None:
    import kombu

    ids = publish_many(db, [(f"k{i % 3}", {"n": i}) for i in range(30)], topic="order.paid")
    with rabbitmq_vhost() as amqp:
        with kombu.Connection(amqp) as conn:
            ex = kombu.Exchange("orders", type="topic", durable=True)
            kombu.Queue("billing", ex, routing_key="order.*", durable=True)(
                conn.channel()
            ).declare()
        relay = Relay(db, f"order.*={amqp}?exchange=orders")
        while relay.deliver_once():
            pass
        relay.close()
        engine = sa.create_engine(db)
        seen: list[str] = []
        handler = InboxHandler(engine, "billing", lambda conn, e: seen.append(e["id"]))
        stop = threading.Event()
        t = threading.Thread(
            target=RabbitMQConsumer(amqp, "billing", handler).run, args=(stop,), daemon=True
        )
        t.start()
        try:
            wait_until(lambda: len(seen) == 30, timeout=30, what="30 messages")
            # The same events again (a relay that died before settling): the inbox drops them.
            dest = open_destination(f"{amqp}?exchange=orders")
            assert (
                dest.send([OutboxEvent(i, "order.paid", None, {}, {}) for i in ids[:5]])
                == [None] * 5
            )
            dest.close()
            time.sleep(1.0)
        finally:
            stop.set()
            t.join(10)
            engine.dispose()
    assert sorted(seen) == sorted(ids)


def test_redis_stream_consumer_with_inbox(db: str, stream_url: str) -> None:
    ids = publish_many(db, [(None, {"n": i}) for i in range(10)])
    relay = Relay(db, f"*={stream_url}?stream=s4")
    relay.deliver_once()
    relay.deliver_once()  # nothing left
    dest = open_destination(f"{stream_url}?stream=s4")  # a re-sent duplicate
    dest.send([OutboxEvent(ids[0], "t.e", None, {"n": 0}, {})])
    dest.close()
    relay.close()
    engine = sa.create_engine(db)
    seen: list[int] = []
    handler = InboxHandler(engine, "c1", lambda conn, e: seen.append(e["payload"]["n"]))
    stop = threading.Event()
    consumer = RedisStreamConsumer(stream_url, "s4", "g1", handler)
    t = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_until(lambda: len(seen) >= 10, timeout=20, what="10 events consumed")
        wait_until(
            lambda: consumer.client.xpending("s4", "g1")["pending"] == 0,
            timeout=20,
            what="every entry acknowledged, the duplicate too",
        )
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(10)
        engine.dispose()
    assert seen == list(range(10))


def test_nats_jetstream_drops_a_resent_event_by_its_id(db: str) -> None:
    ids = publish_many(db, [("k", {"n": i}) for i in range(5)], topic="orders.created")
    with PrivateNats() as server:
        _run(_add_stream(server.url, "ORDERS", ["orders.>"]))
        relay = Relay(db, f"orders.*={server.url}?stream=ORDERS")
        while relay.deliver_once():
            pass
        dest = open_destination(f"{server.url}?stream=ORDERS")
        assert dest.send([OutboxEvent(ids[0], "orders.created", "k", {"n": 0}, {})]) == [None]
        dest.close()
        relay.close()
        messages = _run(_stream_messages(server.url, "ORDERS"))
    assert messages == 5
    assert pending(db) == []


def test_celery_task_destination(db: str, redis_url: str) -> None:
    from celery import Celery

    broker = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    app = Celery("outbox-celery-dest", broker=broker)
    [eid] = publish_many(db, [("k", {"n": 1})], topic="order.created")
    relay = Relay(db, "order.*=celery:billing.on_order", app=app)
    assert relay.deliver_once() == 1
    relay.close()
    raw = client.lrange("celery", 0, -1)
    assert len(raw) == 1
    msg = json.loads(raw[0])
    assert msg["headers"]["task"] == "billing.on_order" and msg["headers"]["id"] == eid


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _add_stream(url: str, name: str, subjects: list[str]) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


async def _stream_messages(url: str, name: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(name)
        return int(info.state.messages)
    finally:
        await nc.close()


def test_a_worker_runs_the_relay_when_routes_are_set(
    db: str, stream_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Events published outside sagas (nothing sends them optimistically) reach the
    stream through the relay bootstep of a plain `celery worker`."""
    env = {
        "SAGALINE_STORE_URL": db,
        "CELERY_BROKER_URL": redis_url,
        "SAGALINE_HOME": str(tmp_path),
        "CRASH_DIR": str(tmp_path),
        "SAGALINE_OUTBOX_ROUTES": f"t.*={stream_url}?stream=boot",
    }
    worker = WorkerProcess(
        "tests.integration.outbox_app", env=env, concurrency=1, workdir=tmp_path / "worker"
    )
    worker.start()
    try:
        ids = publish_many(db, [("k", {"n": i}) for i in range(5)])
        wait_until(
            lambda: len(stream_events(stream_url, "boot")) == 5,
            timeout=30,
            what="the worker's relay",
        )
    finally:
        worker.stop()
    assert [e["id"] for e in stream_events(stream_url, "boot")] == ids
    assert pending(db) == []
