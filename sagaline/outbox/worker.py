"""The outbox in a Celery worker: the relay as a bootstep of the worker's main process,
and optimistic sending, in which the process that committed a step's events sends
them at once (what it misses, the relay finds in the outbox).

`install` (called by `init_app` when outbox routes are set) adds both.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from ..forking import child_safe_lock
from . import metrics, step
from .destinations import parse_routes
from .relay import Relay

if TYPE_CHECKING:
    from celery import Celery

    from ..config import Settings
    from ..runtime import Runtime

log = logging.getLogger("sagaline.outbox")


# -- optimistic sending: the committing process sends at once --------------------


class OptimisticSender:
    """A thread of the committing process that sends a step's events right after
    its commit; what it misses (a crash, an outage) the relay finds in the outbox."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self._queue: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="sagaline-outbox-sender", daemon=True
        )
        self._thread.start()

    def kick(self, event_ids: list[str]) -> None:
        self._queue.put(event_ids)

    def _run(self) -> None:
        while True:
            ids = self._queue.get()
            try:
                self.relay.deliver_once(ids)
            except Exception:
                log.warning("optimistic send failed; the relay will deliver", exc_info=True)


_senders: dict[int, OptimisticSender] = {}
_senders_lock = child_safe_lock()


def _optimistic(runtime: Runtime, event_ids: list[str]) -> None:
    routes = runtime.settings.outbox_routes
    if not routes:
        return
    pid = os.getpid()
    with _senders_lock:
        sender = _senders.get(pid)
        if sender is None:
            sender = _senders[pid] = OptimisticSender(
                Relay(runtime.settings.store_url, routes, app=runtime.app)
            )
    sender.kick(event_ids)


step.committed_hooks.append(_optimistic)


# -- in a worker -------------------------------------------------------------------


class RelayStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the relay in a thread of the worker's main process (outbox_routes set).

    It starts once the pool has forked its processes, and opens its destinations and
    metrics in the main thread first: a process forked while the relay's thread held
    a lock (a module being imported, a metric being created) would inherit it held
    for good and hang at its first use. Later forks (a process replaced) wait for
    the relay's metric writes (forking.py).
    """

    label = "sagaline outbox relay"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._relay: Relay | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        from .._state import current_runtime

        settings = current_runtime(worker.app).settings
        self._relay = Relay(settings.store_url, settings.outbox_routes, app=worker.app)
        self._relay.open_destinations()
        metrics.prepare()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._relay.run, args=(self._stop,), name="sagaline-outbox-relay", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._relay is not None:
            self._relay.close()


def install(app: Celery, settings: Settings) -> None:
    parse_routes(settings.outbox_routes)  # a bad route fails init_app, not a thread
    if settings.outbox_relay and RelayStep not in app.steps["worker"]:
        app.steps["worker"].add(RelayStep)
