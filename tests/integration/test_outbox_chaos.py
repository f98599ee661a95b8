"""Outbox acceptance under failures, per destination (private servers, restarted):
N events from 8 concurrent writers over 100 keys, 10% of the transactions rolled back,
the relay process kill -9'd 3 times and the broker restarted once. At the consumer
(through the inbox, in a process of its own: chaos_consumer.py): every committed event
delivered, no rolled-back one, no duplicate handled, no per-key order inversion.

N defaults to 10,000 (SAGALINE_OUTBOX_CHAOS_EVENTS overrides it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sagaline
from sagaline.stores.sql import SQLStore
from sagaline.testing import kill_pid, wait_until
from tests.harness import PrivateRedis, drop_database, shared_postgres_url
from tests.integration.chaos_consumer import counters, meta, received
from tests.private_nats import PrivateNats
from tests.private_rabbitmq import PrivateRabbitMQ

N = int(os.environ.get("SAGALINE_OUTBOX_CHAOS_EVENTS", "10000"))
WRITERS, KEYS, ROLLBACK = 8, 100, 0.10
REPO = Path(__file__).resolve().parents[2]
RELAY = [
    *("-c", "from sagaline.cli import main; main()", "relay"),
    *("--backoff", "0.05", "--max-backoff", "1", "--max-attempts", "100000"),
]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def db() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_chaos_{uuid.uuid4().hex[:10]}")
    SQLStore(url).migrate()
    engine = sa.create_engine(url)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(counters.insert(), [{"key": f"k{i}", "n": 0} for i in range(KEYS)])
    engine.dispose()
    try:
        yield url
    finally:
        drop_database(url)


class Process:
    """A process of the test's (the relay, the consumer), its output in `log`."""

    def __init__(self, args: list[str], log: Path):
        self.args = [sys.executable, *args]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.args} died early"
        kill_pid(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_pid(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _redis(stack: ExitStack, request: pytest.FixtureRequest) -> tuple[Any, str, str]:
    server = stack.enter_context(PrivateRedis(appendonly=True))
    return server, f"{server.url}?stream=chaos", server.url


def _rabbitmq(stack: ExitStack, request: pytest.FixtureRequest) -> tuple[Any, str, str]:
    import kombu

    # The session's node (booting one takes 10-30 s), in a vhost of this test's own.
    server: PrivateRabbitMQ = request.getfixturevalue("private_rabbitmq")
    server.start()  # a no-op while it runs
    url = server.add_vhost(f"outbox-chaos-{uuid.uuid4().hex[:10]}")
    with kombu.Connection(url) as conn:
        ex = kombu.Exchange("chaos", type="topic", durable=True)
        kombu.Queue("chaos", ex, routing_key="chaos.#", durable=True)(conn.channel()).declare()
    return server, f"{url}?exchange=chaos", url


def _nats(stack: ExitStack, request: pytest.FixtureRequest) -> tuple[Any, str, str]:
    import nats

    server = stack.enter_context(PrivateNats())

    async def add() -> None:
        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(name="CHAOS", subjects=["chaos.>"])
        await nc.close()

    asyncio.run(add())
    return server, f"{server.url}?stream=CHAOS", server.url


@pytest.mark.parametrize(
    "destination",
    [
        "redis",
        "rabbitmq",
        "nats",
    ],
)
def test_outbox_under_relay_kills_and_a_broker_restart(
    db: str, destination: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    engine = sa.create_engine(db, pool_size=WRITERS + 2)
    committed: set[str] = set()
    rolled_back: set[str] = set()
    lock = threading.Lock()
    written = [0]

    def writer(w: int) -> None:
        rng = random.Random(w)
        for i in range(N // WRITERS):
            key = f"k{rng.randrange(KEYS)}"
            eid = f"w{w}-{i}"
            try:
                with engine.begin() as conn:
                    n = conn.execute(
                        counters.update()
                        .where(counters.c.key == key)
                        .values(n=counters.c.n + 1)
                        .returning(counters.c.n)
                    ).scalar_one()
                    sagaline.outbox.publish(
                        conn, "chaos.evt", {"key": key, "n": n}, key=key, event_id=eid
                    )
                    if rng.random() < ROLLBACK:
                        raise _Rollback
            except _Rollback:
                with lock:
                    rolled_back.add(eid)
                continue
            with lock:
                committed.add(eid)
                written[0] += 1

    with ExitStack() as stack:
        server, url, consumer_url = {"redis": _redis, "rabbitmq": _rabbitmq, "nats": _nats}[
            destination
        ](stack, request)
        relay = Process(
            [*RELAY, "--store", db, "--route", f"chaos.*={url}"], tmp_path / "relay.log"
        )
        relay.start()
        summary = tmp_path / "consumer.json"
        consumer = Process(
            ["-m", "tests.integration.chaos_consumer", destination, consumer_url, db, str(summary)],
            tmp_path / "consumer.log",
        )
        consumer.start()
        writers = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        started = time.monotonic()
        for t in writers:
            t.start()
        try:
            total = N * (1 - ROLLBACK)
            for k, at in enumerate((0.2, 0.45, 0.7)):
                wait_until(
                    lambda at=at: (
                        written[0] >= total * at or not any(t.is_alive() for t in writers)
                    ),
                    timeout=120,
                    what=f"{at:.0%} of the writes",
                )
                time.sleep(0.2 + 0.3 * k)
                relay.kill9()
                if k == 1:
                    server.restart()  # the broker, while the relay is down
                relay.start()
            for t in writers:
                t.join(300)
            wait_until(
                lambda: committed <= _delivered(engine) or consumer.exited,
                timeout=300,
                interval=0.5,
                what="every committed event at the consumer",
            )
            time.sleep(1.0)  # late duplicates, if any, would arrive now
        finally:
            consumer.stop()
            relay.stop()
        elapsed = time.monotonic() - started
    delivered = _delivered(engine)
    rows = _received_rows(engine)
    order = _order(engine)
    engine.dispose()
    assert consumer.proc is not None and consumer.proc.returncode == 0, consumer.log.read_text()
    duplicates = json.loads(summary.read_text())["duplicates"]
    inversions = sum(1 for ns in order.values() for a, b in itertools.pairwise(ns) if b <= a)
    print(
        f"\n{destination}: {len(committed)} committed, {len(rolled_back)} rolled back, "
        f"{len(delivered)} delivered, {duplicates} duplicates dropped by the inbox, "
        f"{inversions} inversions, {elapsed:.1f}s"
    )
    assert committed <= delivered
    assert not (rolled_back & delivered)
    assert rows == len(delivered)  # the handler ran once per event
    assert inversions == 0
    assert len(order) == KEYS


class _Rollback(Exception):
    pass


def _delivered(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(received.c.event_id)).scalars())


def _order(engine: sa.Engine) -> dict[str, list[int]]:
    """Per key, the counter values in the order the consumer handled them."""
    order: dict[str, list[int]] = {}
    with engine.connect() as conn:
        for key, n in conn.execute(
            sa.select(received.c.key, received.c.n).order_by(received.c.seq)
        ):
            order.setdefault(key, []).append(n)
    return order


def _received_rows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(received)).scalar_one())
