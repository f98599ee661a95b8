"""Waking a caller when its saga ends, instead of polling: one listener thread per process.

The transaction that makes a saga terminal also sends a notification carrying its
id (PostgreSQL `NOTIFY` on the `sagaline_finished` channel, Redis `PUBLISH` on
`<prefix>:finished`), delivered when the transaction commits. One thread per
process listens on one connection and wakes the `FinishWatch` of each waiting
caller. A caller subscribes before its first read, so a saga that ends between
that read and the wait still wakes it: `SagaHandle.get()` then reads the saga
twice, once before and once after the wake.

The same transaction (or script) also sends, on a channel of its own, the saga's
row (PostgreSQL) or hash (Redis) as it wrote it, when it fits a payload: the watch
then holds the ended saga, decoded as a read decodes it, and `get()` returns it
without its second read. The id goes on its own channel all the same, for
listeners of an earlier sagaline and for sagas too large to send.

A notification is a hint, never the only way: a lost one (the listener's connection
dropped) only delays the caller until its next re-read. While the listener is not
connected every watch reports `live` False and its caller polls; each
(re)connection wakes every watch, so that nothing sent while it was away is
waited for in vain.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..forking import child_safe_lock

if TYPE_CHECKING:
    from ..records import SagaRecord

log = logging.getLogger("sagaline.stores")

# An empty payload means "some saga ended": every waiter re-reads (a saga id too
# long for a notification's payload is sent so).
ANY_SAGA = ""
# How long the first subscriber waits for the listener to connect before polling.
CONNECT_WAIT = 2.0


class FinishWatch(ABC):
    """One caller's wait for the end of one saga, taken before its first read."""

    saga_id: str
    # The saga as the commit that ended it wrote it, when its notification carried it.
    ended: SagaRecord | None = None

    @property
    @abstractmethod
    def live(self) -> bool:
        """Whether `wait` will return once the saga may have ended (else: poll)."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until the saga may have ended (True) or `timeout` seconds pass (False)."""

    def close(self) -> None:  # noqa: B027 - a watch that holds nothing
        """Stop watching."""

    def __enter__(self) -> FinishWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ListenerWatch(FinishWatch):
    """A subscription to the end of one saga, woken by the process's listener thread."""

    def __init__(self, listener: FinishedListener, saga_id: str, generation: int):
        self.saga_id = saga_id
        self._listener = listener
        self._generation = generation
        self._event = threading.Event()

    @property
    def live(self) -> bool:
        """Whether the listener has been connected since this watch began: a wake is due."""
        return self._listener.generation == self._generation

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken

    def wake(self, ended: SagaRecord | None = None) -> None:
        if ended is not None:
            self.ended = ended
        self._event.set()

    def close(self) -> None:
        self._listener.unwatch(self)


Deliver = Callable[[str, "Callable[[], SagaRecord] | None"], None]
# A notification that carries an ended saga -> its id, and how to decode the saga.
DecodeEnded = Callable[[str], "tuple[str, Callable[[], SagaRecord]]"]


class FinishedListener(ABC):
    """A daemon thread that receives the ids of ended sagas and wakes their watches.

    A store makes one per process (a forked child makes its own: threads and
    sockets do not survive the fork) and implements `_listen`. `decode` reads the
    notifications that carry the ended saga itself (`deliver_ended`).
    """

    def __init__(self, name: str, decode: DecodeEnded):
        self.pid = os.getpid()
        self._name = name
        self._decode = decode
        self._lock = child_safe_lock()
        self._watches: dict[str, set[ListenerWatch]] = {}
        # Bumped on every (re)connection; 0 while not connected.
        self.generation = 0
        self._connections = 0
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, saga_id: str) -> ListenerWatch | None:
        """A watch of `saga_id`, or None when the listener cannot connect (poll instead)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
        if not self._connected.wait(CONNECT_WAIT):
            return None
        with self._lock:
            w = ListenerWatch(self, saga_id, self.generation)
            self._watches.setdefault(saga_id, set()).add(w)
            return w

    def unwatch(self, w: ListenerWatch) -> None:
        with self._lock:
            ws = self._watches.get(w.saga_id)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del self._watches[w.saga_id]

    def deliver(self, saga_id: str, ended: Callable[[], SagaRecord] | None = None) -> None:
        """Called by `_listen` for each notification; `ended` decodes the ended saga
        it carried, called only when someone waits for it."""
        with self._lock:
            if saga_id == ANY_SAGA:
                woken = [w for ws in self._watches.values() for w in ws]
            else:
                woken = list(self._watches.get(saga_id, ()))
        record = None
        if woken and ended is not None:
            try:
                record = ended()
            except Exception as exc:  # not what a read would decode: let them read
                log.warning("%s: undecodable ended saga %s (%r)", self._name, saga_id, exc)
        for w in woken:
            w.wake(record)

    def deliver_ended(self, payload: str) -> None:
        """Called by `_listen` for each notification that carries an ended saga."""
        try:
            saga_id, ended = self._decode(payload)
        except (ValueError, KeyError, TypeError):
            return  # not a saga: its id follows on the id's channel anyway
        self.deliver(saga_id, ended)

    def connected(self) -> None:
        """Called by `_listen` once it listens: watches made from now on are live."""
        with self._lock:
            self._connections += 1
            self.generation = self._connections
            woken = [w for ws in self._watches.values() for w in ws]
        self._connected.set()
        for w in woken:  # anything sent while not listening was missed: read again
            w.wake()

    def _disconnected(self) -> None:
        with self._lock:
            self.generation = 0
            woken = [w for ws in self._watches.values() for w in ws]
        self._connected.clear()
        for w in woken:
            w.wake()

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                self._listen(self.deliver, self.connected, self._stop)
                delay = 0.05
            except Exception as exc:  # a dropped connection, a restarting server
                log.debug("%s: listener failed (%s); reconnecting in %.2fs", self._name, exc, delay)
            self._disconnected()
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)

    @abstractmethod
    def _listen(
        self, deliver: Deliver, connected: Callable[[], None], stop: threading.Event
    ) -> None:
        """Connect, subscribe, call `connected()`, then `deliver(saga_id, None)` for
        each id and `deliver_ended(payload)` for each ended saga notified, until
        `stop` is set or the connection fails (raise)."""

    def close(self) -> None:
        self._stop.set()


# The PostgreSQL channels; a database's notifications reach only its own listeners.
PG_CHANNEL = "sagaline_finished"  # the ended saga's id
PG_ENDED_CHANNEL = "sagaline_ended"  # its row, as JSON (pg_hot.py), when it fits
# NOTIFY payloads must stay under 8000 bytes; a longer id is announced as ANY_SAGA.
PG_MAX_PAYLOAD = 7000


def pg_payload(saga_id: str) -> str:
    return saga_id if len(saga_id.encode()) <= PG_MAX_PAYLOAD else ANY_SAGA


class PgFinishedListener(FinishedListener):
    """LISTEN on a psycopg 3 connection of its own, in autocommit mode; `decode`
    reads the payloads of PG_ENDED_CHANNEL."""

    def __init__(self, connect: Callable[[], Any], decode: DecodeEnded):
        super().__init__("sagaline-finished-pg", decode)
        self._connect = connect

    def _listen(
        self, deliver: Deliver, connected: Callable[[], None], stop: threading.Event
    ) -> None:
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {PG_ENDED_CHANNEL}")
            conn.execute(f"LISTEN {PG_CHANNEL}")
            connected()
            while not stop.is_set():
                for n in conn.notifies(timeout=1.0):
                    if n.channel == PG_ENDED_CHANNEL:
                        self.deliver_ended(n.payload)
                    else:
                        deliver(n.payload, None)
        finally:
            conn.close()


class RedisFinishedListener(FinishedListener):
    """SUBSCRIBE to the store's channels on a redis-py pub/sub connection of its own:
    `ended_channel` carries ended sagas (redis_layout.py's `ended_message`, read by
    `decode`), `channel` their ids."""

    def __init__(self, client: Any, channel: str, ended_channel: str, decode: DecodeEnded):
        super().__init__("sagaline-finished-redis", decode)
        self._client = client
        self._channel = channel
        self._ended_channel = ended_channel

    def _listen(
        self, deliver: Deliver, connected: Callable[[], None], stop: threading.Event
    ) -> None:
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(self._ended_channel, self._channel)
            while not stop.is_set():
                msg = pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    # `data` counts this connection's channels: once both are
                    # confirmed, nothing sent from now on is missed.
                    if msg["data"] == 2:
                        connected()
                elif msg["type"] != "message":
                    continue
                elif msg["channel"] == self._ended_channel:
                    self.deliver_ended(str(msg["data"]))
                else:
                    deliver(str(msg["data"]), None)
        finally:
            pubsub.close()
