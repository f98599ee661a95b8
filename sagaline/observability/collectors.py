"""The collectors a worker's registry runs at each scrape, beside prometheus-client's
sample files: the saga gauges read from the store, and the sweep that tells
prometheus-client which pool processes died.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .._state import registered_sagas
from ..states import SagaStatus

if TYPE_CHECKING:
    from ..stores.base import Store

log = logging.getLogger("sagaline")


# Store reads behind the gauges are cached this long: a scrape of every worker every
# few seconds must not become a query storm.
GAUGE_TTL = 5.0
# A scrape waits this long for a fresh store read, then serves the last one.
GAUGE_WAIT = 2.0
IN_PROGRESS = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
# sagaline_sagas_past_deadline counts up to this many sagas per name.
PAST_DEADLINE_CAP = 1000


# -- gauges read from the store ----------------------------------------------------------


class StoreGauges:
    """`sagaline_sagas_in_progress{saga,status}` and the gauges beside it, read from the
    store at scrape time (cached GAUGE_TTL seconds), never counted in process: they are
    right after any crash. Labels come from the saga definitions this worker has."""

    def __init__(self, store: Callable[[], Store], ttl: float = GAUGE_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] | None = None
        self._read_at = 0.0
        self._refreshing: threading.Thread | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        values = self._fresh_values()
        families = {
            "sagaline_sagas_in_progress": GaugeMetricFamily(
                "sagaline_sagas_in_progress",
                "Sagas not finished, read from the store.",
                labels=["saga", "status"],
            ),
            "sagaline_sagas_needing_attention": GaugeMetricFamily(
                "sagaline_sagas_needing_attention",
                "Sagas parked FAILED (a compensation kept failing): an operator resumes them.",
                labels=["saga"],
            ),
            "sagaline_sagas_past_deadline": GaugeMetricFamily(
                "sagaline_sagas_past_deadline",
                f"Sagas still in progress after their timeout (counted up to {PAST_DEADLINE_CAP}).",
                labels=["saga"],
            ),
        }
        up = GaugeMetricFamily(
            "sagaline_store_up", "1 when the last store read for these gauges succeeded."
        )
        up.add_metric([], 0.0 if values is None else 1.0)
        for name, samples in (values or {}).items():
            for labels, value in samples.items():
                families[name].add_metric(list(labels), value)
        yield from families.values()
        yield up

    def _fresh_values(self) -> dict[str, dict[tuple[str, ...], float]] | None:
        # A store outage must not hang the scrape (the store retries for half a minute):
        # the read runs in a thread; after GAUGE_WAIT the last values are served.
        with self._lock:
            if time.monotonic() - self._read_at < self._ttl and self._values is not None:
                return self._values
            thread = self._refreshing
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=self._refresh, daemon=True, name="sagaline-metrics-gauges"
                )
                self._refreshing = thread
                thread.start()
        thread.join(GAUGE_WAIT)
        with self._lock:
            return self._values

    def _refresh(self) -> None:
        try:
            values = read_gauges(self._store(), time.time())
        except Exception:
            log.warning("metrics: could not read saga counts from the store", exc_info=True)
            with self._lock:
                self._values = None
            return
        with self._lock:
            self._values, self._read_at = values, time.monotonic()


def read_gauges(store: Store, now: float) -> dict[str, dict[tuple[str, ...], float]]:
    from ..records import SagaFilter

    in_progress: dict[tuple[str, ...], float] = {}
    attention: dict[tuple[str, ...], float] = {}
    late: dict[tuple[str, ...], float] = {}
    for defn in registered_sagas():
        counts = store.count_by_status(defn.name)
        for status in IN_PROGRESS:
            in_progress[(defn.name, status.value.lower())] = float(counts.get(status, 0))
        attention[(defn.name,)] = float(counts.get(SagaStatus.FAILED, 0))
        if defn.timeout:
            overdue = store.list_sagas(
                SagaFilter(
                    status=list(IN_PROGRESS),
                    name=defn.name,
                    created_before=now - defn.timeout,
                    limit=PAST_DEADLINE_CAP,
                )
            )
            late[(defn.name,)] = float(len(overdue))
    return {
        "sagaline_sagas_in_progress": in_progress,
        "sagaline_sagas_needing_attention": attention,
        "sagaline_sagas_past_deadline": late,
    }


# -- pool processes that died ------------------------------------------------------------


class DeadProcessSweep:
    """Before each scrape, tells prometheus-client which pool processes died (their
    live-gauge files go; their counters stay, so that no counter ever goes down)."""

    _PID = re.compile(r"_(\d+)\.db$")

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Any]:
        from prometheus_client import multiprocess

        pids = {
            int(m.group(1))
            for path in glob.glob(os.path.join(self.directory, "*.db"))
            if (m := self._PID.search(path))
        }
        for pid in pids:
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
