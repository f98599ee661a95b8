"""saga_worker: a real prefork worker for end-to-end tests, never left running.

Each test runs pytest on a user's test file in a subprocess of its own session, as a
user would from a terminal, and checks by pid that no worker process survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sagaline.testing import kill_pid, pid_alive, pids_in_group, wait_until

ROOT = Path(__file__).resolve().parents[2]

USER_TESTS = """
import os
import time

from sagaline.demo.robots.sagas import exploration, exploration_input


def record(worker):
    with open(os.environ["WORKER_PIDS"], "a") as f:
        f.write(" ".join(map(str, worker.group_pids())) + "\\n")


def test_a_saga_runs_on_the_real_worker(saga_worker):
    record(saga_worker)
    assert len(saga_worker.child_pids()) >= 1  # the prefork pool
    handle = exploration.run(**exploration_input("north"))
    assert handle.get(timeout=120)["map_version"] >= 1


def test_interrupted(saga_worker):
    record(saga_worker)
    with open(os.environ["WORKER_PIDS"] + ".ready", "w") as f:
        f.write("waiting")
    time.sleep(300)  # interrupted by the test (Ctrl-C)


def test_failing(saga_worker):
    record(saga_worker)
    assert False, "fails, so that -x stops here"


def test_never_reached(saga_worker):
    record(saga_worker)
"""

CONFTEST = """
import pytest


@pytest.fixture
def saga_worker_app():
    return "sagaline.demo.robots.app"
"""


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    env = dict(os.environ)
    env.update(
        SAGALINE_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(ROOT),
        SAGALINE_STORE_URL=f"sqlite:///{tmp_path}/state.db",
        EXAMPLE_DB_URL=f"sqlite:///{tmp_path}/fleet.db",
        WORKER_PIDS=str(tmp_path / "pids"),
    )
    for name in ("CELERY_BROKER_URL", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return tmp_path, env


def run_pytest(where: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def recorded_pids(where: Path) -> list[int]:
    path = where / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def assert_all_gone(pids: list[int]) -> None:
    assert pids, "the worker recorded its processes"
    try:
        wait_until(
            lambda: not any(pid_alive(p) for p in pids),
            timeout=30,
            interval=0.2,
            what="worker processes to exit",
        )
    finally:
        for p in pids:  # whatever happens, this test leaves nothing behind either
            kill_pid(p)
    assert not any(pids_in_group(p) for p in pids)


def finish(proc: subprocess.Popen[bytes], timeout: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"pytest did not finish:\n{out.decode(errors='replace')}") from exc
    return out.decode(errors="replace")


def test_saga_worker_runs_a_saga_end_to_end_and_stops(project: tuple[Path, dict[str, str]]) -> None:
    where, env = project
    out = finish(run_pytest(where, env, "-k", "real_worker"))
    assert "1 passed" in out, out
    assert_all_gone(recorded_pids(where))


def test_no_worker_survives_an_interrupted_run(project: tuple[Path, dict[str, str]]) -> None:
    where, env = project
    proc = run_pytest(where, env, "-k", "interrupted")
    try:
        wait_until(
            lambda: (where / "pids.ready").exists() or proc.poll() is not None,
            timeout=120,
            interval=0.2,
            what="the test to be running",
        )
        assert proc.poll() is None, finish(proc)
        pids = recorded_pids(where)
        assert pids and all(pid_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        out = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in out, out
    assert_all_gone(pids)


def test_no_worker_survives_a_terminated_run(project: tuple[Path, dict[str, str]]) -> None:
    where, env = project
    proc = run_pytest(where, env, "-k", "interrupted")
    try:
        wait_until(
            lambda: (where / "pids.ready").exists() or proc.poll() is not None,
            timeout=120,
            interval=0.2,
            what="the test to be running",
        )
        assert proc.poll() is None, finish(proc)
        pids = recorded_pids(where)
        os.kill(proc.pid, signal.SIGTERM)  # a CI job cancelled
        finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGTERM
    assert_all_gone(pids)


def test_no_worker_survives_a_run_stopped_by_x(project: tuple[Path, dict[str, str]]) -> None:
    where, env = project
    out = finish(run_pytest(where, env, "-x", "-k", "failing or never_reached"))
    assert "1 failed" in out and "never_reached" not in out.split("short test summary")[0]
    pids = recorded_pids(where)
    assert len(pids) >= 2  # one worker: main process and its pool
    assert_all_gone(pids)
