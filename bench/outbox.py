"""`python -m bench.outbox`: the transactional outbox's figures on local PostgreSQL.

- O1 commit -> publish latency (p50/p99) to a Redis stream: the relay woken by
  NOTIFY, the committing process sending right after its commit (optimistic), and
  the relay polling alone (every second, as on SQLite/MySQL);
- O2 relay throughput (events/s) from one relay, 100 keys, to Redis Streams and to
  RabbitMQ (publisher confirms);
- O3 queries per second of an idle relay.

A private redis-server, a vhost of its own on the shared RabbitMQ and a fresh
PostgreSQL database; each is removed at the end. One JSON line per figure on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from typing import Any

import redis
import sqlalchemy as sa

import sagaline
from sagaline.outbox.relay import OptimisticSender, Relay
from sagaline.stores.sql import SQLStore
from tests.harness import PrivateRedis, drop_database, rabbitmq_vhost, shared_postgres_url


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency(db: str, stream_url: str, mode: str, n: int) -> dict[str, Any]:
    """Commit one event at a time; time until it is in the stream."""
    stream = f"lat-{mode}"
    client = redis.Redis.from_url(stream_url)
    engine = sa.create_engine(db)
    relay = Relay(db, f"*={stream_url}?stream={stream}")
    stop = threading.Event()
    runner = None
    if mode in ("notify", "poll"):
        if mode == "poll":
            # Without LISTEN: how SQLite and MySQL relays wait (poll every second).
            relay._wait = lambda listener, stop_: (  # type: ignore[method-assign]
                stop_.wait(relay.poll) and None
            )
        runner = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        runner.start()
        time.sleep(0.5)
    sender = OptimisticSender(relay) if mode == "optimistic" else None
    last = "0-0"
    samples = []
    for i in range(n):
        with engine.begin() as conn:
            eid = sagaline.outbox.publish(conn, "bench.lat", {"i": i}, key=f"k{i % 10}")
        committed = time.perf_counter()
        if sender is not None:  # what a step does after its commit
            sender.kick([eid])
        reply = client.xread({stream: last}, block=5000, count=1)
        if not reply:
            raise RuntimeError(f"{mode}: event {i} not delivered within 5 s")
        samples.append(time.perf_counter() - committed)
        last = reply[0][1][0][0]
        time.sleep(0.01)
    stop.set()
    if runner is not None:
        runner.join(5)
    relay.close()
    engine.dispose()
    return {
        "figure": "O1",
        "mode": mode,
        "events": n,
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 2),
    }


def throughput(db: str, url: str, name: str, n: int) -> dict[str, Any]:
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        for i in range(n):
            sagaline.outbox.publish(conn, "bench.tp", {"i": i}, key=f"k{i % 100}")
    engine.dispose()
    relay = Relay(db, f"*={url}")
    started = time.perf_counter()
    delivered = 0
    while True:
        got = relay.deliver_once()
        if not got:
            break
        delivered += got
    elapsed = time.perf_counter() - started
    relay.close()
    if delivered != n:
        raise RuntimeError(f"{name}: {delivered} of {n} delivered")
    return {"figure": "O2", "destination": name, "events": n, "events_per_s": round(n / elapsed)}


def idle_queries(db: str, stream_url: str, seconds: float) -> dict[str, Any]:
    relay = Relay(db, f"*={stream_url}?stream=idle")
    count = [0]
    sa.event.listen(
        relay.engine, "before_cursor_execute", lambda *a: count.__setitem__(0, count[0] + 1)
    )
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    runner.start()
    time.sleep(1.0)
    count[0] = 0
    time.sleep(seconds)
    per_s = count[0] / seconds
    stop.set()
    runner.join(5)
    relay.close()
    return {"figure": "O3", "queries_per_s": round(per_s, 2), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    args = parser.parse_args()
    lat_n, tp_n, idle_s = (20, 500, 3.0) if args.quick else (300, 5000, 10.0)
    db = shared_postgres_url(f"sagaline_bench_outbox_{uuid.uuid4().hex[:10]}")
    SQLStore(db).migrate()
    try:
        with PrivateRedis() as server, rabbitmq_vhost() as amqp:
            # Polling waits up to a second per event: fewer samples.
            results = [
                latency(db, server.url, mode, lat_n if mode != "poll" else lat_n // 10)
                for mode in ("optimistic", "notify", "poll")
            ]
            results.append(throughput(db, f"{server.url}?stream=tp", "redis-streams", tp_n))
            results.append(throughput(db, f"{amqp}?exchange=bench", "rabbitmq", tp_n))
            results.append(idle_queries(db, server.url, idle_s))
    finally:
        drop_database(db)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
