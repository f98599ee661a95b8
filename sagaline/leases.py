"""The claims this process holds: the owner each one names, and the heartbeat that
renews their leases while their bodies run (execution.py)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .context import saga_log_extra
from .forking import child_safe_lock
from .records import Owner
from .states import Phase

if TYPE_CHECKING:
    from .runtime import Runtime
    from .stores.base import Store

log = logging.getLogger("sagaline")


def claim_owner(runtime: Runtime) -> Owner | None:
    """Who claims a step in this process: None outside a worker (the lease alone then)."""
    if runtime.worker_node is None or runtime.worker_boot is None:
        return None
    return Owner(runtime.worker_node, runtime.worker_boot, os.getpid())


class Heartbeat:
    """Renews the leases of the claims this process is running, every lease/3 seconds.

    A step may run longer than the lease; only a worker that stops (killed, frozen,
    partitioned from the store) lets its leases expire.
    """

    def __init__(self, store: Store, lease: float, clock: Callable[[], float] = time.time):
        self.store = store
        self.lease = lease
        self.clock = clock
        self._claims: dict[int, tuple[str, str, Phase, int]] = {}
        self._next = 0
        self._lock = child_safe_lock()
        self._thread: threading.Thread | None = None

    def add(self, saga_id: str, step: str, phase: Phase, attempt: int) -> int:
        with self._lock:
            self._next += 1
            self._claims[self._next] = (saga_id, step, phase, attempt)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sagaline-heartbeat", daemon=True
                )
                self._thread.start()
            return self._next

    def remove(self, token: int) -> None:
        with self._lock:
            self._claims.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.lease / 3)
            with self._lock:
                claims = list(self._claims.values())
            for saga_id, step, phase, attempt in claims:
                try:
                    self.store.renew_lease(saga_id, step, phase, attempt, self.clock() + self.lease)
                except Exception:
                    log.warning(
                        "could not renew the lease of saga %s step %s",
                        saga_id,
                        step,
                        exc_info=True,
                        extra=saga_log_extra(saga_id, None, step, phase, attempt),
                    )
