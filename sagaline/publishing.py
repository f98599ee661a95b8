"""How a step dispatch leaves this process: its Celery message, sent now or when due.

`Runtime.publish` decides what to do with each dispatch (a child saga, a retry to
wait out, a publish that failed); this module holds the two ways a step's message
is sent: `send_step` builds and publishes it at once, `DelayedPublisher` holds a
retry's message until its backoff has passed.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .context import saga_log_extra
from .forking import fork_guard
from .records import HEADER, Dispatch
from .signatures import filter_kwargs
from .states import Phase

if TYPE_CHECKING:
    from celery import Celery

    from .observability.tracing import Tracing

log = logging.getLogger("sagaline")


def send_step(app: Celery, d: Dispatch, tracing: Tracing | None) -> None:
    """Publish the message of a step dispatch (a child saga's is run: children.py),
    in a publish span when `tracing` is given."""
    task = app.tasks.get(d.task_name)
    # Send only what the task accepts (the worker filters again, for senders that
    # do not import the task).
    kwargs = filter_kwargs(task.run, d.kwargs) if task is not None else dict(d.kwargs)
    meta = {
        "saga_id": d.saga_id,
        "saga": d.saga_name,
        "fingerprint": d.fingerprint,
        "step": d.step,
        "phase": d.phase.value,
        "attempt": d.attempt,
        "ready_at": d.ready_at or time.time(),
    }
    headers: dict[str, Any] = {HEADER: meta}
    if d.trace_context is not None:
        meta["trace"] = d.trace_context
        # The saga's root span as W3C `traceparent`, for a consumer's instrumentation
        # (set again after a publisher's instrumentation wrote there: tracing.py).
        headers["traceparent"] = d.trace_context.partition(":")[0]
    options: dict[str, Any] = {
        "headers": headers,
        "serializer": "json",
        "ignore_result": True,
        # What monitors show of the arguments (Flower, events): Celery's saferepr
        # costs ~15 µs even for `()`, on every step.
        "argsrepr": "()",
    }
    shown = flat_repr(kwargs, app.amqp.kwargsrepr_maxsize)
    if shown is not None:
        options["kwargsrepr"] = shown
    # Sent from a task, like the next task of a Celery chain: with the reply_to of the
    # message being run. Without one, Celery names this thread (kombu's uuid3, an MD5),
    # which makes every pool process load OpenSSL's code (~0.6 MB of its RSS); no
    # reply is ever sent to it (ignore_result).
    running = app.current_worker_task
    reply_to = getattr(running.request, "reply_to", None) if running is not None else None
    if reply_to:
        options["reply_to"] = reply_to
    if d.queue:
        options["queue"] = d.queue
    if d.timeout and d.phase is Phase.FORWARD:
        options["soft_time_limit"] = d.timeout
        options["time_limit"] = d.timeout + max(5.0, d.timeout * 0.1)
    with tracing.publishing(d) if tracing is not None else contextlib.nullcontext():
        if task is not None:
            task.apply_async(args=(), kwargs=kwargs, **options)
        else:
            app.send_task(d.task_name, args=(), kwargs=kwargs, **options)


_FLAT = (str, int, float, bool, type(None))


def flat_repr(kwargs: dict[str, Any], limit: int) -> str | None:
    """`repr(kwargs)`, cut to `limit` characters, when every value is a str of at most
    `limit` characters, a number, a bool or None (what Celery's saferepr writes then,
    but for its strings unescaped). None otherwise: Celery's saferepr writes it, never
    past its limit, where a built-in repr would first write all of a large payload."""
    for value in kwargs.values():
        kind = type(value)
        if kind not in _FLAT or (kind is str and len(value) > limit):
            return None
    text = repr(kwargs)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class DelayedPublisher:
    """Publishes the messages of retries when their backoff has passed, from one thread.

    sagaline never gives a message a broker ETA (Celery's countdown): a worker holds
    such a message unacknowledged in memory until it is due; on a quorum queue it
    then takes a prefetch slot that Celery cannot give back (per-consumer QoS), so a
    few waiting retries stall the worker; on Redis one that waits longer than the
    visibility timeout is delivered again. The wait lives here instead, with nothing
    taken from the broker, and the step's due time in the store (backoff +
    `redispatch_after`) is the durable copy: if this process ends first, the sweeper
    publishes the message then.
    """

    def __init__(self, publish: Callable[[Dispatch], None]):
        self.pid = os.getpid()
        self._publish = publish
        self._queue: list[tuple[float, int, Dispatch]] = []
        self._seq = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, d: Dispatch) -> None:
        with self._wake:
            self._seq += 1
            heapq.heappush(self._queue, (time.monotonic() + d.countdown, self._seq, d))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="sagaline-delayed-publish"
                )
                self._thread.start()
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue or self._queue[0][0] > time.monotonic():
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._wake.wait(wait)
                _, _, d = heapq.heappop(self._queue)
            try:
                with fork_guard():  # a pool may fork meanwhile (forking.py)
                    self._publish(d)  # logs its own failures; the sweeper covers them
            except Exception:
                log.exception(
                    "delayed publish of saga %s step %s failed",
                    d.saga_id,
                    d.step,
                    extra=saga_log_extra(d.saga_id, None, d.step, d.phase, d.attempt),
                )
