"""The consumer inbox: process each message once per consumer.

    with engine.begin() as conn:
        with sagaline.inbox.receive(conn, consumer="billing", message_id=msg_id) as fresh:
            if fresh:
                conn.execute(invoices.insert(), ...)

`receive` records `(consumer, message_id)` under a unique key in the handler's own
transaction: it commits with the handler's writes, and a redelivered message (or a
second delivery racing the first) finds it and gets `fresh` False. Two consumers
of one event each record it under their own name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .exceptions import InputError
from .outbox import metrics
from .outbox.events import connection_of
from .payload import MAX_KEY_LENGTH, MAX_NAME_LENGTH, check_text
from .stores.schema import inbox

# Called with the consumer's name on every duplicate.
duplicate_hooks: list[Callable[[str], None]] = [metrics.inbox_duplicate]


def record(connection: Any, *, consumer: str, message_id: str) -> bool:
    """Record the message in the connection's transaction; False if it was already."""
    check_text(consumer, "consumer", limit=MAX_NAME_LENGTH, rule="text", where="consumer")
    check_text(message_id, "message_id", limit=MAX_KEY_LENGTH, rule="text", where="message_id")
    conn = connection_of(connection)
    if not conn.in_transaction():
        raise InputError(
            "sagaline.inbox.receive needs a connection inside a transaction "
            "(engine.begin() or session.begin()): the message is recorded "
            "with the handler's writes",
            rule="transaction",
            where="connection",
        )
    row = {"consumer": consumer, "message_id": message_id, "received_at": time.time()}
    dialect = conn.dialect.name
    result = conn.execute(_insert_if_new(dialect), row)
    # PostgreSQL and SQLite say through RETURNING (a driver may not report a rowcount).
    if result.rowcount == 1 if dialect in ("mysql", "mariadb") else result.first() is not None:
        return True
    for hook in duplicate_hooks:
        hook(consumer)
    return False


def _insert_if_new(dialect: str) -> Any:
    """An insert that does nothing on a duplicate (no error, no savepoint): rowcount
    tells. A concurrent first delivery makes it wait for that one's commit."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(inbox).on_conflict_do_nothing().returning(inbox.c.consumer)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(inbox).on_conflict_do_nothing().returning(inbox.c.consumer)
    if dialect in ("mysql", "mariadb"):
        return inbox.insert().prefix_with("IGNORE")
    raise InputError(
        f"the inbox supports PostgreSQL, MySQL/MariaDB and SQLite, not {dialect}",
        rule="dialect",
        where="connection",
    )


@contextmanager
def receive(connection: Any, *, consumer: str, message_id: str) -> Iterator[bool]:
    """Yields True the first time `consumer` receives `message_id` (in a transaction
    that commits), False for a duplicate: then skip the work, nothing was changed."""
    yield record(connection, consumer=consumer, message_id=message_id)
