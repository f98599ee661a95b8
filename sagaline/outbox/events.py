"""Writing outbox rows: the insert that joins the caller's transaction."""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..exceptions import InputError
from ..payload import DEFAULT_MAX_BYTES, MAX_KEY_LENGTH, MAX_NAME_LENGTH, check_text
from ..stores.schema import OUTBOX_KEY_BUCKETS, outbox, outbox_keys

PENDING = "pending"
DEAD = "dead"


def key_bucket(key: str) -> int:
    """The lock row of a key: the same in every process (crc32, not Python's hash)."""
    return zlib.crc32(key.encode("utf-8")) % OUTBOX_KEY_BUCKETS


def connection_of(connection: Any) -> Connection:
    """A SQLAlchemy Connection from a Connection or an ORM Session."""
    if isinstance(connection, Connection):
        return connection
    get = getattr(connection, "connection", None)
    if callable(get):  # sqlalchemy.orm.Session: its connection, in its transaction
        conn = get()
        if isinstance(conn, Connection):
            return conn
    raise TypeError(f"expected a SQLAlchemy Connection or Session, got {type(connection).__name__}")


def insert_event(
    conn: Connection,
    topic: str,
    payload: Any,
    *,
    key: str | None,
    headers: Mapping[str, str] | None,
    event_id: str,
) -> str:
    """Add one event to the outbox in `conn`'s transaction; returns its id."""
    check_text(topic, "topic", limit=MAX_NAME_LENGTH, rule="text", where="topic")
    check_text(event_id, "event_id", limit=MAX_KEY_LENGTH, rule="text", where="event_id")
    if key is not None:
        check_text(key, "key", limit=MAX_KEY_LENGTH, rule="text", where="key")
    if headers is not None and (
        not isinstance(headers, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise InputError("headers must map strings to strings", rule="type", where="headers")
    try:
        size = len(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"the payload of an event on {topic!r} is not JSON: {exc}", rule="json", where="payload"
        ) from None
    if size > DEFAULT_MAX_BYTES:
        raise InputError(
            f"the payload of an event on {topic!r} is {size} bytes, more than {DEFAULT_MAX_BYTES}",
            rule="size",
            where="payload",
        )
    if key is not None:
        # Held until commit: transactions publishing one key commit in turn, and the
        # id below (taken after the lock) follows that order.
        conn.execute(
            outbox_keys.update()
            .where(outbox_keys.c.bucket == key_bucket(key))
            .values(n=outbox_keys.c.n + 1)
        )
    now = time.time()
    conn.execute(
        outbox.insert(),
        {
            "event_id": event_id,
            "topic": topic,
            "key": key,
            "payload": payload,
            "headers": dict(headers) if headers else None,
            "created_at": now,
            "status": PENDING,
            "attempts": 0,
            "available_at": now,
            "last_error": None,
        },
    )
    return event_id


def publish(
    connection: Any,
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    event_id: str | None = None,
) -> str:
    """Add an event to the outbox in the transaction of `connection` (a SQLAlchemy
    Connection or Session, on the database that holds sagaline's tables).

    The event is sent by the relay once that transaction commits, and never if it
    rolls back. Events with the same `key` are delivered in commit order. Returns the
    event's id (`event_id`, else a new UUID), which consumers use to drop duplicates.
    """
    conn = connection_of(connection)
    if not conn.in_transaction():
        raise InputError(
            "sagaline.outbox.publish needs a connection inside a transaction "
            "(engine.begin() or session.begin()): the event commits with it",
            rule="transaction",
            where="connection",
        )
    return insert_event(
        conn,
        topic,
        payload,
        key=key,
        headers=headers,
        event_id=event_id if event_id is not None else str(uuid.uuid4()),
    )


def pending_count(conn: Connection) -> int:
    return int(
        conn.execute(
            sa.select(sa.func.count()).select_from(outbox).where(outbox.c.status == PENDING)
        ).scalar_one()
    )


def list_events(conn: Connection, *, dead: bool = False, limit: int = 50) -> list[Any]:
    """Outbox rows, oldest first: pending ones (with their attempts and last error),
    or the dead letters."""
    return list(
        conn.execute(
            sa.select(outbox)
            .where(outbox.c.status == (DEAD if dead else PENDING))
            .order_by(outbox.c.id)
            .limit(limit)
        )
    )


def retry_events(conn: Connection, event_ids: list[str] | None = None) -> int:
    """Make dead letters (those named, or all) pending again, with fresh attempts."""
    q = outbox.update().where(outbox.c.status == DEAD)
    if event_ids is not None:
        q = q.where(outbox.c.event_id.in_(event_ids))
    return int(
        conn.execute(q.values(status=PENDING, attempts=0, available_at=time.time())).rowcount
    )
