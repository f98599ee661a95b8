"""sagaline's pytest plugin, loaded by pytest through the `pytest11` entry point
(`pip install 'sagaline[testing]'`): no conftest needed.

Fixtures: `saga_env` (the real engine in-process, an in-memory broker, virtual
time), `saga_clock`, `mock_step`, `faults`, `saga_store` (per `--sagaline-store`),
`saga_worker` (a real prefork worker subprocess). Everything is imported when a
fixture is used, so that loading the plugin costs pytest nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._store_option import describe_choice

if TYPE_CHECKING:
    from celery import Celery

    from .stores.base import Store
    from .testing import WorkerProcess
    from .testkit import Faults, SagaEnv, StepMock, VirtualClock

STORE_OPTION = "--sagaline-store"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sagaline", "sagaline sagas")
    group.addoption(
        STORE_OPTION,
        default="memory",
        metavar="STORE",
        help="store for saga_env: memory (default), sqlite, postgresql://..., redis://..."
        " or redis+cluster://...; each test gets its own database or key prefix,"
        " removed afterwards",
    )


# The `--sagaline-store` of the pytest session running now (innermost first):
# `explore_failures` runs each scenario on such a store.
_session_stores: list[str] = []
_STORE_PUSHED = pytest.StashKey[bool]()


def session_store() -> str | None:
    """The `--sagaline-store` value of the running pytest session, if any."""
    return _session_stores[-1] if _session_stores else None


def pytest_configure(config: pytest.Config) -> None:
    value = config.getoption(STORE_OPTION)
    try:
        describe_choice(value)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    _session_stores.append(value)
    config.stash[_STORE_PUSHED] = True


@pytest.fixture
def saga_apps() -> list[Celery] | None:
    """The Celery apps `saga_env` takes over; None: every app that called init_app.
    Override it in a conftest to name yours."""
    return None


@pytest.fixture
def saga_settings() -> dict[str, Any]:
    """Settings for `saga_env` (lease, redispatch_after, ... from config.py); override
    it in a conftest."""
    return {}


@pytest.fixture
def saga_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store of this test, as `--sagaline-store` says: isolated and cleaned."""
    from .testkit.stores import isolated_store

    value = request.config.getoption(STORE_OPTION)
    with isolated_store(describe_choice(value), value, tmp_path) as store:
        yield store


@pytest.fixture
def saga_clock() -> VirtualClock:
    """Virtual time: `saga_clock.advance("1h")` fires what falls due on the way."""
    from .testkit import VirtualClock

    return VirtualClock()


@pytest.fixture
def faults() -> Faults:
    """Inject crashes, duplicates, lost messages, expired leases, failing compensations."""
    from .testkit import Faults

    return Faults()


@pytest.fixture
def saga_env(
    saga_store: Store,
    saga_clock: VirtualClock,
    faults: Faults,
    saga_apps: list[Celery] | None,
    saga_settings: dict[str, Any],
) -> Iterator[SagaEnv]:
    """The real engine in this process: `start()`/`run()` sagas, `step()`,
    `run_until_done()`, `advance()`, `sweep()`."""
    from .testkit import SagaEnv

    env = SagaEnv(saga_apps, store=saga_store, clock=saga_clock, faults=faults, **saga_settings)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def mock_step(saga_env: SagaEnv) -> Callable[..., StepMock]:
    """`mock_step(task, returns=... | raises=... | side_effect=...)` for a step or a
    compensation, in `saga_env`."""
    return saga_env.mock


@pytest.fixture
def saga_worker_app() -> str:
    """The `-A` module of `saga_worker`; override it in a conftest."""
    raise pytest.UsageError(
        "saga_worker needs the Celery app module: define a "
        "`saga_worker_app` fixture returning e.g. 'myproject.celery'"
    )


@pytest.fixture
def saga_worker_env() -> dict[str, str]:
    """Environment variables for `saga_worker` (store and broker URLs); override it."""
    return {}


@pytest.fixture
def saga_worker(
    saga_worker_app: str, saga_worker_env: dict[str, str], tmp_path: Path
) -> Iterator[WorkerProcess]:
    """A real prefork `celery worker` subprocess, ready (without celery.ping) when the
    test starts; its whole process group is killed at teardown, also after Ctrl-C."""
    from .testing import WorkerProcess

    worker = WorkerProcess(saga_worker_app, env=saga_worker_env, workdir=tmp_path / "saga_worker")
    _stop_workers_on_sigterm()
    _LIVE_WORKERS.append(worker)
    try:
        worker.start()
        yield worker
    finally:
        try:
            worker.stop(timeout=10)
        except BaseException:
            worker.kill()  # a second Ctrl-C during the warm shutdown
            raise
        finally:
            _LIVE_WORKERS.remove(worker)


# Workers alive now: killed at session end whatever stopped the run (Ctrl-C, -x).
_LIVE_WORKERS: list[WorkerProcess] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    _kill_live_workers()
    if config.stash.get(_STORE_PUSHED, False):
        _session_stores.pop()


def _kill_live_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.kill()


def _stop_workers_on_sigterm() -> None:
    """pytest ends on SIGTERM (a CI job cancelled) without tearing fixtures down; a
    worker runs in a session of its own, so it would outlive it: kill it first."""
    import os
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _kill_live_workers()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
