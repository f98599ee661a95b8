"""Ready-made consumers of outbox events, with the inbox: each message is handled once
per consumer, in one transaction with the handler's writes, and acknowledged after it
commits (a crash in between redelivers it, and the inbox drops the repeat).

    def on_order(conn, event):
        conn.execute(invoices.insert().values(order_id=event["payload"]["order_id"]))

    handler = InboxHandler(engine, "billing", on_order)
    RedisStreamConsumer("redis://localhost/0", "order.created", "billing", handler).run(stop)

An event is the dict the relay sends: `{"id", "topic", "key", "payload", "headers"}`.
`sagaline.start_on(...)` makes a handler that starts a saga per event instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import inbox

if TYPE_CHECKING:
    from ..definition import Saga
    from ..handle import SagaHandle
    from ..runtime import Runtime

log = logging.getLogger("sagaline.outbox")

Handler = Callable[[dict[str, Any]], Any]


class InboxHandler:
    """Calls `handle(connection, event)` in a transaction that records the event in the
    inbox under `consumer`; a duplicate is skipped (returns False)."""

    def __init__(self, engine: Any, consumer: str, handle: Callable[[Any, dict[str, Any]], Any]):
        self.engine, self.consumer, self.handle = engine, consumer, handle

    def __call__(self, event: dict[str, Any]) -> bool:
        with self.engine.begin() as conn:
            if not inbox.record(conn, consumer=self.consumer, message_id=str(event["id"])):
                return False
            self.handle(conn, event)
        return True


def start_on(
    topic: str,
    saga: Saga,
    *,
    input: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    runtime: Runtime | None = None,
) -> Callable[[dict[str, Any]], SagaHandle | None]:
    """A handler that starts `saga` for each event whose topic matches `topic` (a glob),
    with the event id as the idempotency key: a redelivered event finds the saga it
    already started. The saga's input is `input(event)`, default the event's payload."""
    from .._state import current_runtime

    def handle(event: dict[str, Any]) -> SagaHandle | None:
        if not fnmatch.fnmatchcase(str(event.get("topic", "")), topic):
            return None
        rt = runtime or current_runtime()
        data = input(event) if input is not None else event["payload"]
        return rt.start_saga(saga, data, idempotency_key=str(event["id"]))

    return handle


class RedisStreamConsumer:
    """A consumer group member on one stream (XREADGROUP, XACK after the handler).
    At start it first re-reads its own unacknowledged entries (it died mid-way)."""

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        handler: Handler,
        *,
        name: str = "consumer-1",
        batch: int = 100,
    ):
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.stream, self.group, self.name, self.batch = stream, group, name, batch
        self.handler = handler

    def _ensure_group(self) -> None:
        import redis

        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event) -> None:
        backlog = True
        while not stop.is_set():
            try:
                self._ensure_group()
                start = "0" if backlog else ">"
                reply: Any = self.client.xreadgroup(
                    self.group,
                    self.name,
                    {self.stream: start},
                    count=self.batch,
                    block=None if backlog else 500,
                )
                entries = reply[0][1] if reply else []
                if backlog and not entries:
                    backlog = False
                    continue
                for entry_id, fields in entries:
                    f = {k.decode(): v.decode() for k, v in fields.items()}
                    self.handler(
                        {
                            "id": f["id"],
                            "topic": f["topic"],
                            "key": f["key"] or None,
                            "payload": json.loads(f["payload"]),
                            "headers": json.loads(f.get("headers") or "{}"),
                        }
                    )
                    self.client.xack(self.stream, self.group, entry_id)
            except Exception:
                log.warning("redis stream consumer: error; retrying", exc_info=True)
                backlog = True
                stop.wait(0.5)


class RabbitMQConsumer:
    """Consumes a queue with manual acknowledgements, after the handler returned."""

    def __init__(self, url: str, queue: str, handler: Handler, *, prefetch: int = 100):
        self.url, self.queue, self.handler, self.prefetch = url, queue, handler, prefetch

    def run(self, stop: threading.Event) -> None:
        import kombu

        k: Any = kombu
        while not stop.is_set():
            try:
                with k.Connection(self.url, connect_timeout=5) as conn:
                    channel = conn.channel()
                    channel.basic_qos(0, self.prefetch, False)

                    def on_message(body: Any, message: Any) -> None:
                        event = json.loads(body) if isinstance(body, (str, bytes)) else body
                        self.handler(event)
                        message.ack()

                    queue = k.Queue(self.queue, durable=True, no_declare=True)
                    with k.Consumer(
                        channel,
                        queues=[queue],
                        callbacks=[on_message],
                        accept=["json", "application/json"],
                        no_ack=False,
                    ):
                        while not stop.is_set():
                            with contextlib.suppress(TimeoutError):
                                conn.drain_events(timeout=0.5)
            except Exception:
                log.warning("rabbitmq consumer: error; reconnecting", exc_info=True)
                stop.wait(0.5)


class NatsConsumer:
    """A durable JetStream pull consumer; acks after the handler returned.

    Ordered: at every (re)connection the durable consumer is re-created at its ack
    floor, so messages left unacknowledged by a lost connection come again first, in
    stream order, instead of after their ack wait, behind later messages of the same
    key (the inbox drops those already handled). Run one process per durable name.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        durable: str,
        handler: Handler,
        *,
        subject: str | None = None,
        batch: int = 100,
    ):
        self.url, self.stream, self.durable = url, stream, durable
        self.subject, self.handler, self.batch = subject, handler, batch

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._run(stop))

    async def _subscribe(self, js: Any) -> Any:
        from nats.js import api
        from nats.js.errors import NotFoundError

        start: int | None = None
        try:
            info = await js.consumer_info(self.stream, self.durable)
            start = int(info.ack_floor.stream_seq) + 1
            await js.delete_consumer(self.stream, self.durable)
        except NotFoundError:
            pass
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            filter_subject=self.subject,
            deliver_policy=(
                api.DeliverPolicy.ALL if start is None else api.DeliverPolicy.BY_START_SEQUENCE
            ),
            opt_start_seq=start,
        )
        await js.add_consumer(self.stream, config)
        return await js.pull_subscribe_bind(self.durable, self.stream)

    async def _run(self, stop: threading.Event) -> None:
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        while not stop.is_set():
            nc: Any = None
            try:
                nc = await nats.connect(
                    self.url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False
                )
                js = nc.jetstream()
                sub = await self._subscribe(js)
                while not stop.is_set():
                    try:
                        msgs = await sub.fetch(self.batch, timeout=0.5)
                    except NatsTimeout:
                        continue
                    for m in msgs:
                        headers = dict(m.headers or {})
                        event_id = headers.pop("Nats-Msg-Id", "")
                        key = headers.pop("sagaline-key", "") or None
                        await asyncio.to_thread(
                            self.handler,
                            {
                                "id": event_id,
                                "topic": m.subject,
                                "key": key,
                                "payload": json.loads(m.data),
                                "headers": headers,
                            },
                        )
                        await m.ack()
            except Exception:
                log.warning("nats consumer: error; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)
            finally:
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()
