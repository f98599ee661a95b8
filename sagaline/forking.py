"""Forks of the pool and the threads of a worker's main process.

The pool forks its children from the main thread: at start, possibly after the
threads of the worker's main process (the sweeper's, the delayed publisher's) have
started, and to replace one that died, which is exactly when the sweeper thread is
busy handing its claims back. A child forked while one of these threads holds a lock
(the store's connection pool, the broker's producer pool, the lock of a module being
imported, such as the `idna` codec that a first connect by host name imports, or
prometheus-client's lock of every metric value) inherits it held by a thread that
does not exist there, and hangs at its first use of it, with the messages it was
given. So these threads do such work under `fork_guard()`, and a fork waits until
none of them is inside it, but never long: work that waits out a store or broker
outage must not freeze the worker's event loop.

Metrics are written under a lock of their own, `metrics_guard()`, in every
process (observability/metrics.py, outbox/metrics.py): prometheus-client's
multiprocess mode has one lock for every value, and the outbox relay's thread and
the store gauges of /metrics write metrics in the main process. A fork waits for
it too, after `fork_guard()`; a metric write waits only for a fork or another
write, never for the sweeper's store work.

sagaline's own locks are made by `child_safe_lock()`: a forked child finds each of
them free, as the standard library resets its own (logging's, threading's), so no
lock taken by a thread of the parent (the store gauges' first read, opening the
store) can stop a child.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

_FORK_LOCK = threading.RLock()
_METRICS_LOCK = threading.RLock()
_FORK_WAIT = 5.0
_forking = threading.local()


# Every lock child_safe_lock() made that still exists, reset in a forked child.
_CHILD_SAFE: weakref.WeakSet[Any] = weakref.WeakSet()


def child_safe_lock(*, reentrant: bool = False) -> Any:
    """A `threading.Lock` (or `RLock`) that a forked child finds free, whatever a
    thread of the parent held at the fork. What it guards may then be half-updated
    in the child, as it would be after that thread died; none of sagaline's locks
    guards more than a cache or a lazily made object."""
    lock = threading.RLock() if reentrant else threading.Lock()
    _CHILD_SAFE.add(lock)
    return lock


def fork_guard() -> threading.RLock:
    """The lock to hold around work that a fork must not cut in two."""
    return _FORK_LOCK


def metrics_guard() -> threading.RLock:
    """The lock to hold while writing a metric (taken after `fork_guard()`, if both)."""
    return _METRICS_LOCK


def _before_fork() -> None:
    _forking.held = _FORK_LOCK.acquire(timeout=_FORK_WAIT)
    _forking.metrics_held = _METRICS_LOCK.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    if getattr(_forking, "metrics_held", False):
        _forking.metrics_held = False
        _METRICS_LOCK.release()
    if getattr(_forking, "held", False):
        _forking.held = False
        _FORK_LOCK.release()


def _after_fork_in_child() -> None:
    global _FORK_LOCK, _METRICS_LOCK
    # Held by the forking thread of the parent: start anew.
    _FORK_LOCK, _METRICS_LOCK = threading.RLock(), threading.RLock()
    _forking.held = _forking.metrics_held = False
    for lock in list(_CHILD_SAFE):
        lock._at_fork_reinit()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
