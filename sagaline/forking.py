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
outage must not freeze the worker's event loop. Metrics are written under it in
every process (observability/metrics.py, outbox/metrics.py): the outbox relay's
thread and the store gauges of /metrics write them in the main process.
"""

from __future__ import annotations

import os
import threading

_FORK_LOCK = threading.RLock()
_FORK_WAIT = 5.0
_forking = threading.local()


def fork_guard() -> threading.RLock:
    """The lock to hold around work that a fork must not cut in two."""
    return _FORK_LOCK


def _before_fork() -> None:
    _forking.held = _FORK_LOCK.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    if getattr(_forking, "held", False):
        _forking.held = False
        _FORK_LOCK.release()


def _after_fork_in_child() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()  # held by the forking thread of the parent: start anew
    _forking.held = False


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
