"""The consumer of test_outbox_chaos.py, in a process of its own.

`python -m tests.integration.chaos_consumer DESTINATION URL DATABASE SUMMARY` consumes
the chaos events from DESTINATION ("redis", "rabbitmq" or "nats" at URL) through the
inbox, one transaction per event, recording each in `chaos_received` of DATABASE,
until SIGTERM; then it writes to SUMMARY how many duplicates the inbox dropped.

In the test's process it would share the GIL with the eight writer threads, and wait
for it after each of its round trips: it then fell minutes behind the writers.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sagaline.outbox.consumers import (
    InboxHandler,
    NatsConsumer,
    RabbitMQConsumer,
    RedisStreamConsumer,
)

meta = sa.MetaData()
counters = sa.Table(
    "chaos_counters",
    meta,
    sa.Column("key", sa.String(20), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
)
# One consumer, one transaction at a time: `seq` is the order the events were handled in.
received = sa.Table(
    "chaos_received",
    meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(80), nullable=False),
    sa.Column("key", sa.String(20), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
)


def consumer(destination: str, url: str, handler: Any) -> Any:
    """The sagaline consumer of the chaos events at `url` (the test set them up)."""
    if destination == "redis":
        return RedisStreamConsumer(url, "chaos", "g", handler)
    if destination == "rabbitmq":
        return RabbitMQConsumer(url, "chaos", handler)
    if destination == "nats":
        return NatsConsumer(url, "CHAOS", "chaos", handler, subject="chaos.>")
    raise SystemExit(f"unknown destination {destination!r}")


def main(argv: list[str]) -> int:
    destination, url, database, summary = argv
    # The server is never crashed here: a commit need not wait for its WAL flush.
    engine = sa.create_engine(database, connect_args={"options": "-c synchronous_commit=off"})
    duplicates = 0

    def handle(conn: Any, event: dict[str, Any]) -> None:
        p = event["payload"]
        conn.execute(received.insert().values(event_id=event["id"], key=p["key"], n=p["n"]))

    inbox = InboxHandler(engine, "chaos", handle)

    def consume(event: dict[str, Any]) -> None:
        nonlocal duplicates
        if not inbox(event):
            duplicates += 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=consumer(destination, url, consume).run, args=(stop,))
    thread.start()
    while not stop.wait(0.2):
        if not thread.is_alive():
            return 1
    thread.join(15)
    engine.dispose()
    Path(summary).write_text(json.dumps({"duplicates": duplicates}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
