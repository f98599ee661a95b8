"""Liveness and readiness probes for workers (`sagaline health`), and the heartbeat file.

Liveness asks only whether the worker process still runs: a thread of its main
process touches a file every `heartbeat_interval` seconds, and the probe reads the
file's age, calling neither the broker nor the store. A probe that pinged the broker
(`celery inspect ping`) would restart every worker during a broker outage, which
restarting cannot fix (celery#4079). Readiness asks whether the store and the broker
answer, within a time limit, so that an orchestrator can hold traffic and rollouts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from ..config import Settings, default_home

if TYPE_CHECKING:
    from celery import Celery

    from ..runtime import Runtime

log = logging.getLogger("sagaline")

# Exit statuses of `sagaline health` (documented in the README).
EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
# Readiness gives each dependency this long to answer.
READINESS_TIMEOUT = 2.0


def heartbeat_path(settings: Settings | None = None) -> Path:
    """The heartbeat file of a worker with these settings (default: from the environment)."""
    configured = (
        settings.heartbeat_file
        if settings is not None
        else os.environ.get("SAGALINE_HEARTBEAT_FILE", "")
    )
    return Path(configured) if configured else default_home() / "worker.heartbeat"


class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Touches the heartbeat file from a thread of the worker's main process.

    Started before the consumer connects (Celery starts its Consumer step last), so a
    worker that waits for an unreachable broker at start is alive, not hung.
    """

    label = "sagaline heartbeat"

    def __init__(self, worker: Any, **kwargs: Any):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        from ..runtime import current_runtime

        settings = current_runtime(worker.app).settings
        path = heartbeat_path(settings)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:
            # A worker that cannot write its heartbeat still serves sagas; only a
            # liveness probe, if one is configured, will say so.
            log.warning(
                "cannot write the heartbeat file %s (%s): `sagaline health "
                "--liveness` will fail; set SAGALINE_HEARTBEAT_FILE",
                path,
                exc,
            )
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat,
            args=(path, settings.heartbeat_interval),
            name="sagaline-heartbeat-file",
            daemon=True,
        )
        self._thread.start()

    def _beat(self, path: Path, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(OSError):  # a full disk is the liveness probe's news
                path.touch()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        # A stopped worker is not alive: a stale file must not vouch for its next start.
        with contextlib.suppress(Exception):
            from ..runtime import current_runtime

            heartbeat_path(current_runtime(worker.app).settings).unlink(missing_ok=True)


def check_liveness(path: Path, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """Whether the heartbeat file was touched within `max_age` seconds."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False, f"no heartbeat file at {path} (is the worker running?)"
    except OSError as exc:
        return False, f"cannot read the heartbeat file {path}: {exc}"
    age = (time.time() if now is None else now) - mtime
    if age > max_age:
        return False, f"heartbeat {age:.0f}s old (limit {max_age:.0f}s): {path}"
    return True, f"alive: heartbeat {max(age, 0.0):.1f}s old"


def check_readiness(runtime: Runtime, timeout: float = READINESS_TIMEOUT) -> tuple[bool, str]:
    """Whether the store and the broker both answer within `timeout` seconds."""
    checks = {
        "store": lambda: _store_answers(runtime),
        "broker": lambda: _broker_answers(runtime.app, timeout),
    }
    outcomes: dict[str, BaseException | None] = {}

    def run(name: str) -> None:
        try:
            checks[name]()
            outcomes[name] = None
        except Exception as exc:
            outcomes[name] = exc

    # Daemon threads, not an executor: a check stuck in a driver (a server that drops
    # packets) is left behind, and neither the answer nor the process exit waits for it.
    threads = [
        threading.Thread(target=run, args=(name,), daemon=True, name=f"sagaline-readiness-{name}")
        for name in checks
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems = []
    for name in checks:
        if name not in outcomes:
            problems.append(f"{name} did not answer within {timeout:g}s")
        elif (exc := outcomes[name]) is not None:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problems.append(f"{name}: {first}")
    if problems:
        return False, "not ready: " + "; ".join(problems)
    return True, "ready: store and broker answer"


def _store_answers(runtime: Runtime) -> None:
    from ..ops import open_store

    store = open_store(runtime.settings.store_url, read_only=True, give_up_after=0.0)
    try:
        store.count_by_status("sagaline-readiness-probe")  # one indexed read
    finally:
        store.close()


def _broker_answers(app: Celery, timeout: float) -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        # kombu connects lazily on some transports: a round trip proves it answers.
        conn.default_channel  # noqa: B018


def probe(
    runtime: Runtime | None, readiness: bool, max_age: float, timeout: float = READINESS_TIMEOUT
) -> tuple[bool, str]:
    """`sagaline health`: readiness of `runtime`'s store and broker, or the liveness of
    its worker (no runtime: the heartbeat file the environment names)."""
    if readiness:
        if runtime is None:
            raise ValueError("readiness needs the app's runtime")
        return check_readiness(runtime, timeout)
    return check_liveness(heartbeat_path(runtime.settings if runtime else None), max_age)
