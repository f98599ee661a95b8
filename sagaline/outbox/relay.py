"""The relay: sends committed outbox rows to their destinations, in key order.

Each round claims the *head of every key* — the pending row with no earlier pending
row of the same key — plus rows without a key, in id order. On PostgreSQL and MySQL
the claim is `SELECT ... FOR UPDATE SKIP LOCKED` (see `claim`) in a transaction that lasts until
the destination confirmed the batch and the rows are deleted (or their failure
recorded), so several relays never send one key's events out of order, and a relay
killed mid-batch only releases its locks (its rows are sent again: at least once).
There is no "last id" cursor: a row is pending until delivered, so a transaction
that commits late (with an id lower than rows already sent) is still found.

Failures back off exponentially per row (its key waits behind it); after
`max_attempts` the row becomes a dead letter (`sagaline outbox ls --dead`, `retry`),
and the rest of its key proceeds.

Wake-up: PostgreSQL's NOTIFY from the outbox insert trigger (at commit), with a poll
every `poll` seconds as a fallback; SQLite and MySQL poll. A relay that has work goes
on without waiting.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..stores.schema import outbox
from ..stores.sql import SQLStore
from . import metrics
from .destinations import Destination, OutboxEvent, open_destination, parse_routes, safe_url
from .events import DEAD, PENDING

log = logging.getLogger("sagaline.outbox")

CHANNEL = "sagaline_outbox"


def claim_query(
    dialect: str, now: float, limit: int, event_ids: Sequence[str] | None = None
) -> Any:
    o, earlier = outbox, outbox.alias("earlier")
    blocked = sa.exists().where(
        earlier.c.key == o.c.key, earlier.c.id < o.c.id, earlier.c.status == PENDING
    )
    q = (
        sa.select(o)
        .where(o.c.status == PENDING, o.c.available_at <= now, sa.or_(o.c.key.is_(None), ~blocked))
        .order_by(o.c.id)
        .limit(limit)
    )
    if event_ids is not None:
        q = q.where(o.c.event_id.in_(list(event_ids)))
    if dialect == "postgresql":
        q = q.with_for_update(skip_locked=True, of=o)
    return q


def claim(
    conn: Connection, dialect: str, now: float, limit: int, event_ids: Sequence[str] | None = None
) -> list[Any]:
    """The heads to send, locked (PostgreSQL, MySQL) until the transaction ends."""
    q = claim_query(dialect, now, limit, event_ids)
    if dialect != "mysql":
        return list(conn.execute(q).all())
    # InnoDB would take the NOT EXISTS subquery's reads as locking reads too, and
    # wait for a transaction that has not committed its row of a neighbouring key.
    # So: find the heads with a consistent read, then lock them by primary key. A
    # head stays a head until it is sent (a key's later rows commit after it), and
    # a head another relay sent meanwhile is no longer pending.
    ids = list(conn.execute(q.with_only_columns(outbox.c.id)).scalars())
    if not ids:
        return []
    return list(
        conn.execute(
            sa.select(outbox)
            .where(outbox.c.id.in_(ids), outbox.c.status == PENDING)
            .order_by(outbox.c.id)
            .with_for_update(skip_locked=True)
        ).all()
    )


class Relay:
    def __init__(
        self,
        store_url: str,
        routes: Any,
        *,
        app: Any = None,
        batch: int = 200,
        max_attempts: int = 12,
        backoff: float = 0.5,
        max_backoff: float = 300.0,
        poll: float = 1.0,
    ):
        self.routes = parse_routes(routes)
        if not self.routes:
            raise ValueError("a relay needs at least one route (topic-pattern=url)")
        self.store = SQLStore(store_url)
        self.store.migrate()
        # READ COMMITTED: InnoDB then takes no gap locks, which would make a round wait
        # for a transaction that has not committed its row yet.
        self.engine = (
            self.store.engine.execution_options(isolation_level="READ COMMITTED")
            if self.store.dialect == "mysql"
            else self.store.engine
        )
        self.dialect = self.store.dialect
        self.app = app
        self.batch, self.max_attempts = batch, max_attempts
        self.backoff, self.max_backoff, self.poll = backoff, max_backoff, min(poll, 1.0)
        self._destinations: dict[str, Destination] = {}
        self._lock = threading.Lock()  # one round at a time per relay object

    # -- one round ---------------------------------------------------------------

    def deliver_once(self, event_ids: Sequence[str] | None = None) -> int:
        """Claim, send and settle one batch; returns how many rows were delivered."""
        with self._lock:
            now = time.time()
            if self.dialect == "sqlite":
                # One writer at a time: read, send, then settle in a short write.
                with self.engine.connect() as conn:
                    rows = claim(conn, self.dialect, now, self.batch, event_ids)
                if not rows:
                    return 0
                outcome = self._send(rows)
                with self.engine.execution_options(sagaline_write=True).begin() as conn:
                    return self._settle(conn, rows, outcome)
            with self.engine.begin() as conn:
                rows = claim(conn, self.dialect, now, self.batch, event_ids)
                if not rows:
                    return 0
                outcome = self._send(rows)
                return self._settle(conn, rows, outcome)

    def _route(self, topic: str) -> str | None:
        for pattern, url in self.routes:
            if fnmatch.fnmatchcase(topic, pattern):
                return url
        return None

    def open_destinations(self) -> None:
        """Open every route's destination now, in the calling thread (which imports
        its client library); one that cannot be opened is tried again when used."""
        for _, url in self.routes:
            try:
                self._destination(url)
            except Exception:
                log.warning(
                    "outbox destination %s: could not open it; the relay tries again "
                    "when it sends there",
                    safe_url(url),
                    exc_info=True,
                )

    def _destination(self, url: str) -> Destination:
        d = self._destinations.get(url)
        if d is None:
            d = self._destinations[url] = open_destination(url, self.app)
        return d

    def _send(self, rows: Sequence[Any]) -> dict[int, str | None]:
        outcome: dict[int, str | None] = {}
        by_url: dict[str, list[Any]] = {}
        for r in rows:
            url = self._route(r.topic)
            if url is None:
                outcome[r.id] = f"no outbox route matches topic {r.topic!r}"
            else:
                by_url.setdefault(url, []).append(r)
        for url, batch in by_url.items():
            events = [
                OutboxEvent(r.event_id, r.topic, r.key, r.payload, r.headers or {}) for r in batch
            ]
            try:
                results = self._destination(url).send(events)
            except Exception as exc:
                results = [f"{type(exc).__name__}: {exc}"] * len(events)
            shown = safe_url(url)
            for r, why in zip(batch, results, strict=True):
                outcome[r.id] = why
                metrics.sent(shown, r.created_at, why)
        return outcome

    def _settle(self, conn: Connection, rows: Sequence[Any], outcome: dict[int, str | None]) -> int:
        done = [r.id for r in rows if outcome.get(r.id) is None]
        if done:
            # One row per statement, by primary key: InnoDB may scan another index for
            # an IN list and wait for a neighbouring transaction that has not committed.
            conn.execute(
                outbox.delete().where(outbox.c.id == sa.bindparam("k_id")),
                [{"k_id": i} for i in done],
            )
        now = time.time()
        for r in rows:
            why = outcome.get(r.id)
            if why is None:
                continue
            attempts = r.attempts + 1
            dead = attempts >= self.max_attempts
            delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1))
            conn.execute(
                outbox.update()
                .where(outbox.c.id == r.id)
                .values(
                    attempts=attempts,
                    last_error=why[:2000],
                    status=DEAD if dead else PENDING,
                    available_at=now + delay * random.uniform(0.8, 1.2),
                )
            )
            if dead:
                metrics.dead_letter()
                log.error(
                    "outbox event %s (%s) is a dead letter after %s attempts: %s",
                    r.event_id,
                    r.topic,
                    attempts,
                    why,
                )
            else:
                log.warning(
                    "outbox event %s (%s) not delivered (attempt %s), retrying in %.1fs: %s",
                    r.event_id,
                    r.topic,
                    attempts,
                    delay,
                    why,
                )
        return len(done)

    # -- running -----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set: as long as rounds deliver, then on a NOTIFY or
        every `poll` seconds."""
        listener: Any = None
        failures = 0
        while not stop.is_set():
            try:
                delivered = self.deliver_once()
                failures = 0
            except Exception:
                failures += 1
                log.exception("outbox relay round failed; trying again")
                delivered = 0
                stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            metrics.polled(self)
            if delivered:
                continue
            listener = self._wait(listener, stop)
        if listener is not None:
            listener.close()

    def _wait(self, listener: Any, stop: threading.Event) -> Any:
        if self.dialect != "postgresql":
            stop.wait(self.poll)
            return None
        try:
            if listener is None:
                listener = self._listen()
            for _ in listener.notifies(timeout=self.poll, stop_after=1):
                pass
            return listener
        except Exception:
            log.warning("outbox relay: lost its LISTEN connection; polling", exc_info=True)
            if listener is not None:
                with contextlib.suppress(Exception):  # already broken
                    listener.close()
            stop.wait(self.poll)
            return None

    def _listen(self) -> Any:
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(
            url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5
        )
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def close(self) -> None:
        for d in self._destinations.values():
            try:
                d.close()
            except Exception:
                log.debug("closing outbox destination", exc_info=True)
        self._destinations.clear()
        self.store.close()
