"""Where the relay sends events, named by URL; each waits for the broker's confirm.

- `amqp://user:pass@host:port/vhost?exchange=events&routing_key=...` (RabbitMQ, through
  kombu with publisher confirms; the routing key defaults to the event's topic; the
  exchange is declared durable, of type `exchange_type`, default topic).
- `redis://host:port/db?stream=name&maxlen=N` (Redis Streams, XADD; the stream
  defaults to the topic).
- `nats://host:port?stream=NAME` (NATS JetStream, with `Nats-Msg-Id` set to the event
  id, so the stream drops re-sent events within its duplicate window; the subject
  is the topic, and a stream must capture it; nats-py).
- `celery:task.name` (a Celery task of the relay's app, called with the event as its
  one argument and the event id as its task id).

An event reaches a destination as JSON `{"id", "topic", "key", "payload", "headers"}`
(RabbitMQ: the body, with the id as message_id; Redis: fields of the stream entry;
NATS: the data, headers as message headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..exceptions import ConfigurationError


@dataclass(frozen=True)
class OutboxEvent:
    id: str
    topic: str
    key: str | None
    payload: Any
    headers: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "key": self.key,
            "payload": self.payload,
            "headers": self.headers,
        }


class Destination(Protocol):
    url: str

    def send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        """Send and wait for confirms: per event None (confirmed) or why it failed."""

    def close(self) -> None: ...


def _split(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), query


def _unknown(url: str, query: dict[str, str], known: set[str]) -> None:
    extra = set(query) - known
    if extra:
        raise ConfigurationError(
            f"outbox destination {url!r}: unknown option(s) "
            f"{', '.join(sorted(extra))} (known: {', '.join(sorted(known))})"
        )


def safe_url(url: str) -> str:
    """The URL without its password, for logs and listings."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return url


class RabbitMQ:
    def __init__(self, url: str):
        import kombu

        k: Any = kombu  # untyped
        self.url = url
        base, query = _split(url)
        _unknown(url, query, {"exchange", "exchange_type", "routing_key", "timeout"})
        if "exchange" not in query:
            raise ConfigurationError(
                f"outbox destination {safe_url(url)!r} names no exchange: add ?exchange=NAME"
            )
        self.routing_key = query.get("routing_key")
        self.timeout = float(query.get("timeout", "10"))
        self.exchange: Any = k.Exchange(
            query["exchange"], type=query.get("exchange_type", "topic"), durable=True
        )
        # Publisher confirms: publish() returns once the broker has the message.
        self._conn: Any = k.Connection(
            base, transport_options={"confirm_publish": True}, connect_timeout=self.timeout
        )
        self._producer: Any = None

    def _ensure(self) -> Any:
        if self._producer is None:
            self._conn.ensure_connection(max_retries=1)
            channel = self._conn.channel()
            self.exchange(channel).declare()
            self._producer = self._conn.Producer(channel, exchange=self.exchange)
        return self._producer

    def send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        results: list[str | None] = []
        for i, e in enumerate(events):
            try:
                self._ensure().publish(
                    json.dumps(e.as_dict()),
                    routing_key=self.routing_key or e.topic,
                    message_id=e.id,
                    headers={**e.headers, "sagaline-event-id": e.id},
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    retry=False,
                    timeout=self.timeout,
                )
                results.append(None)
            except Exception as exc:
                self._reset()
                # The connection is gone: the rest of the batch waits for the next round.
                why = f"{type(exc).__name__}: {exc}"
                results.extend([why] * (len(events) - i))
                break
        return results

    def _reset(self) -> None:
        self._producer = None
        with contextlib.suppress(Exception):  # closing a broken connection
            self._conn.close()
        self._conn = self._conn.clone()

    def close(self) -> None:
        self._producer = None
        self._conn.close()


class RedisStream:
    def __init__(self, url: str):
        try:
            import redis
        except ImportError:
            raise ConfigurationError(
                "a redis:// outbox destination needs redis-py: pip install 'sagaline[outbox]'"
            ) from None

        self.url = url
        base, query = _split(url)
        _unknown(url, query, {"stream", "maxlen"})
        self.stream = query.get("stream")
        self.maxlen = int(query["maxlen"]) if "maxlen" in query else None
        self._client = redis.Redis.from_url(base, socket_timeout=10, socket_connect_timeout=5)

    def send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        pipe = self._client.pipeline(transaction=False)
        for e in events:
            pipe.xadd(
                self.stream or e.topic,
                {
                    "id": e.id,
                    "topic": e.topic,
                    "key": e.key or "",
                    "payload": json.dumps(e.payload),
                    "headers": json.dumps(e.headers),
                },
                maxlen=self.maxlen,
                approximate=True,
            )
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:
            return [f"{type(exc).__name__}: {exc}"] * len(events)
        return [f"{type(r).__name__}: {r}" if isinstance(r, Exception) else None for r in replies]

    def close(self) -> None:
        self._client.close()


class NatsJetStream:
    """nats-py is asyncio: a private event loop in a thread runs the client."""

    def __init__(self, url: str):
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "a nats:// outbox destination needs nats-py: pip install 'sagaline[outbox]'"
            ) from None
        self.url = url
        base, query = _split(url)
        _unknown(url, query, {"stream", "timeout"})
        self.server = base
        self.stream = query.get("stream")
        self.timeout = float(query.get("timeout", "10"))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="sagaline-outbox-nats"
        )
        self._thread.start()
        self._nc: Any = None
        self._js: Any = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout * 3)

    async def _send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        import nats

        if self._nc is None or not self._nc.is_connected:
            if self._nc is not None:
                await self._nc.close()
            self._nc = await nats.connect(
                self.server,
                connect_timeout=self.timeout,
                max_reconnect_attempts=0,
                allow_reconnect=False,
            )
            self._js = self._nc.jetstream(timeout=self.timeout)

        async def one(e: OutboxEvent) -> str | None:
            try:
                await self._js.publish(
                    e.topic,
                    json.dumps(e.payload).encode(),
                    stream=self.stream,
                    headers={**e.headers, "Nats-Msg-Id": e.id, "sagaline-key": e.key or ""},
                )
                return None
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        return list(await asyncio.gather(*(one(e) for e in events)))

    def send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        try:
            results: list[str | None] = self._run(self._send(events))
        except Exception as exc:
            self._run_quietly(self._drop())
            return [f"{type(exc).__name__}: {exc}"] * len(events)
        if any(results):
            self._run_quietly(self._drop())
        return results

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await nc.close()

    def _run_quietly(self, coro: Any) -> None:
        with contextlib.suppress(Exception):  # best effort
            self._run(coro)

    def close(self) -> None:
        self._run_quietly(self._drop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class CeleryTask:
    def __init__(self, url: str, app: Any):
        self.url = url
        self.task = url.split(":", 1)[1]
        if not self.task:
            raise ConfigurationError(
                f"outbox destination {url!r}: name the task, celery:<task name>"
            )
        if app is None:
            raise ConfigurationError(
                f"outbox destination {url!r} needs the Celery app: run "
                f"the relay in a worker, or `sagaline relay --app`"
            )
        self.app = app
        conf = app.conf.broker_transport_options or {}
        with app.connection_for_write() as conn:
            amqp = conn.transport.driver_type == "amqp"
        if amqp and not conf.get("confirm_publish"):
            raise ConfigurationError(
                f"outbox destination {url!r}: the app's RabbitMQ broker publishes without "
                f"confirms; set broker_transport_options={{'confirm_publish': True}} "
                f"(sagaline.init_app does unless told otherwise)"
            )

    def send(self, events: Sequence[OutboxEvent]) -> list[str | None]:
        results: list[str | None] = []
        for e in events:
            try:
                self.app.send_task(self.task, args=[e.as_dict()], task_id=e.id, retry=False)
                results.append(None)
            except Exception as exc:
                results.append(f"{type(exc).__name__}: {exc}")
        return results

    def close(self) -> None:
        pass


def open_destination(url: str, app: Any = None) -> Destination:
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("amqp", "amqps", "pyamqp"):
        return RabbitMQ(url)
    if scheme in ("redis", "rediss"):
        return RedisStream(url)
    if scheme in ("nats", "tls"):
        return NatsJetStream(url)
    if scheme == "celery":
        return CeleryTask(url, app)
    raise ConfigurationError(
        f"outbox destination {safe_url(url)!r}: unknown scheme "
        f"{scheme!r} (amqp://, redis://, nats://, celery:<task>; "
        f"Kafka is not supported)"
    )


def parse_routes(spec: str | Sequence[str] | dict[str, str]) -> list[tuple[str, str]]:
    """`"order.*=amqp://...?exchange=orders *=redis://..."` (whitespace-separated
    `topic-pattern=url`, first match wins), a list of such items, or a dict."""
    if isinstance(spec, dict):
        return list(spec.items())
    items = spec.split() if isinstance(spec, str) else list(spec)
    routes = []
    for item in items:
        pattern, sep, url = item.partition("=")
        if not sep or not pattern or not url:
            raise ConfigurationError(
                f"outbox route {item!r} is not topic-pattern=url "
                f"(e.g. 'order.*=redis://localhost:6379/0')"
            )
        routes.append((pattern, url))
    return routes
