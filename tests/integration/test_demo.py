"""`sagaline demo` as a user runs it: a real subprocess that starts its own real worker."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from sagaline.records import SagaFilter
from sagaline.states import SagaStatus
from sagaline.stores import store_from_url
from tests.conftest import WorkerFactory
from tests.harness import REPO_ROOT, WorkerProcess, pid_alive, wait_until

pytestmark = pytest.mark.timeout(240)

SAGALINE = str(Path(sys.executable).parent / "sagaline")
FORWARD = ["allocate_robots", "plan_route", "explore_area", "integrate_maps"]


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A machine with no sagaline or Celery configuration at all."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "SAGALINE_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }
    env.update(extra)
    return env


def run_demo(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    # Not from the repository root: the demo finds its saga and its worker by itself.
    try:
        proc = subprocess.run(
            [SAGALINE, "demo", *args],
            cwd=tmp_path,
            env=bare_env(tmp_path, **env),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        left = kill_left_worker(tmp_path / "home")
    assert not left, "the demo exited and left its worker running"
    return proc, time.monotonic() - started


def kill_left_worker(home: Path) -> bool:
    """Kill the demo's worker group if it is still running (the demo was killed, or failed
    to stop it); True if it was."""
    try:
        pid = int((home / "demo" / "worker.pid").read_text())
    except (OSError, ValueError):
        return False
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the demo's worker to die")
    return True


def saga_ids(store_url: str, *statuses: SagaStatus) -> list[str]:
    store = store_from_url(store_url)
    try:
        return [
            s.saga_id for s in store.list_sagas(SagaFilter(status=list(statuses), limit=10_000))
        ]
    finally:
        store.close()


def section(output: str, title: str) -> list[str]:
    """The lines of the timeline printed under `title`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    body = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        body.append(line)
    return body


def assert_demo_output(out: str) -> None:
    """What the default demo prints, wherever sagaline is installed."""
    summary_statuses = re.findall(r"│\s*\d+\s*│\s*[0-9a-f-]{36}\s*│\s*([A-Z]+)\s*│", out)
    assert len(summary_statuses) == 8
    assert "COMPLETED" in summary_statuses and "COMPENSATED" in summary_statuses
    assert set(summary_statuses) <= {"COMPLETED", "COMPENSATED"}

    completed = section(out, "Timeline of a completed saga")
    assert [
        s for s in FORWARD if any(f"{s} " in ln and "succeeded" in ln for ln in completed)
    ] == FORWARD
    assert "saga COMPLETED" in completed[-1]

    compensated = section(out, "Timeline of a compensated saga")
    undo_lines = [ln for ln in compensated if "compensated (attempt" in ln]
    undone = [next(s for s in FORWARD if f" {s} (" in ln) for ln in undo_lines]
    # The scripted run that fails at the last step undoes all four, last applied first.
    assert undone == list(reversed(FORWARD))
    assert "(rollback_integration)" in undo_lines[0] and "(release_robots)" in undo_lines[-1]
    first_undo = compensated.index(undo_lines[0])
    assert all("compensated" not in ln for ln in compensated[:first_undo])
    assert "saga COMPENSATED" in compensated[-1]

    assert "✓ robot check: no robot is left allocated" in out
    assert "worker stopped" in out


def test_demo_on_a_bare_machine_completes_and_compensates_in_reverse_order(tmp_path: Path) -> None:
    proc, elapsed = run_demo(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"

    assert_demo_output(out)


def test_demo_leaves_no_robot_allocated_by_a_compensated_saga(tmp_path: Path) -> None:
    proc, _ = run_demo(tmp_path, "--runs", "6", "--fail-rate", "0.35", "--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = tmp_path / "home" / "demo" / "state.db"
    compensated = saga_ids(f"sqlite:///{path}", SagaStatus.COMPENSATED)
    ended = saga_ids(f"sqlite:///{path}", SagaStatus.COMPENSATED, SagaStatus.COMPLETED)
    assert len(ended) == 6
    db = sqlite3.connect(path)
    try:
        marks = ",".join("?" * len(compensated))
        held = db.execute(
            f"SELECT id, assigned_saga FROM robots WHERE assigned_saga IN ({marks})", compensated
        ).fetchall()
        assert held == []
        # Every ended mission gave its robots back; compensations left no route or map.
        assert db.execute(
            "SELECT count(*) FROM robots WHERE status != 'idle' OR assigned_saga IS NOT NULL"
        ).fetchone() == (0,)
        assert db.execute(
            f"SELECT count(*) FROM routes WHERE saga_id IN ({marks})", compensated
        ).fetchone() == (0,)
        assert db.execute(
            f"SELECT count(*) FROM maps WHERE saga_id IN ({marks})", compensated
        ).fetchone() == (0,)
        assert {
            r[0]
            for r in db.execute(
                f"SELECT status FROM missions WHERE saga_id IN ({marks})", compensated
            )
        } <= {"aborted"}
    finally:
        db.close()


def test_demo_uses_redis_and_postgres_when_configured(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    proc, _ = run_demo(
        tmp_path, "--runs", "4", CELERY_BROKER_URL=redis_url, SAGALINE_STORE_URL=pg_url
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"broker: {redis_url}" in proc.stdout
    assert not (tmp_path / "home" / "demo" / "state.db").exists()
    compensated = saga_ids(pg_url, SagaStatus.COMPENSATED)
    assert compensated and saga_ids(pg_url, SagaStatus.COMPLETED)
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        held = conn.execute(
            "SELECT id FROM robots WHERE assigned_saga = ANY(%s)", (compensated,)
        ).fetchall()
    assert held == []


def test_demo_exits_non_zero_when_a_saga_does_not_end(tmp_path: Path) -> None:
    proc, _ = run_demo(tmp_path, "--runs", "1", "--slow", "explore_area=4", "--timeout", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 saga(s) did not end within 1s" in proc.stdout
    assert "worker stopped" in proc.stdout


def test_demo_exits_non_zero_when_a_compensated_saga_still_holds_a_robot(tmp_path: Path) -> None:
    """Something outside the saga allocates a robot in its name while it runs: its
    compensation releases only the robots it allocated, so the demo's check must fail."""
    db_path = tmp_path / "home" / "demo" / "state.db"
    proc = subprocess.Popen(
        [SAGALINE, "demo", "--runs", "1", "--fail-at", "explore_area", "--slow", "plan_route=3"],
        cwd=tmp_path,
        env=bare_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def allocated_saga() -> str | None:
            if not db_path.exists():
                return None
            db = sqlite3.connect(db_path, timeout=30)
            try:
                row = db.execute(
                    "SELECT assigned_saga FROM robots WHERE assigned_saga IS NOT NULL LIMIT 1"
                ).fetchone()
            except sqlite3.OperationalError:  # the demo has not created the fleet yet
                return None
            finally:
                db.close()
            return str(row[0]) if row else None

        # allocate_robots has run; plan_route sleeps 3 s: the saga is still running.
        wait_until(
            lambda: allocated_saga() is not None,
            timeout=60,
            interval=0.05,
            what="the saga to allocate its robots",
        )
        saga_id = allocated_saga()
        db = sqlite3.connect(db_path, timeout=30)
        try:
            with db:
                db.execute(
                    "UPDATE robots SET status = 'allocated', assigned_saga = ? "
                    "WHERE id = (SELECT max(id) FROM robots)",
                    (saga_id,),
                )
        finally:
            db.close()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = kill_left_worker(tmp_path / "home")
    assert not left, "the demo exited and left its worker running"
    assert proc.returncode == 1, out
    assert "COMPENSATED" in out
    assert (
        f"✗ robot check: 1 robot(s) still allocated by a compensated saga: rover-24 "
        f"(saga {saga_id})" in out
    )


def test_interrupted_demo_stops_its_worker(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [SAGALINE, "demo", "--runs", "2", "--slow", "explore_area=30"],
        cwd=REPO_ROOT,
        env=bare_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        worker_pid = None
        for line in proc.stdout:
            found = re.search(r"worker: pid (\d+)", line)
            if found:
                worker_pid = int(found.group(1))
                break
        assert worker_pid is not None and pid_alive(worker_pid)
        time.sleep(1.0)  # the sagas are running (explore_area sleeps)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_left_worker(tmp_path / "home")
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    wait_until(lambda: not pid_alive(worker_pid), timeout=5, what="demo worker to exit")


def test_a_killed_demo_leaves_the_pid_of_its_worker_for_cleanup(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [SAGALINE, "demo", "--runs", "1", "--slow", "explore_area=30"],
        cwd=tmp_path,
        env=bare_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = tmp_path / "home" / "demo" / "worker.ready"
        wait_until(ready.exists, timeout=90, what="the demo's worker to be ready")
        proc.kill()  # no chance to stop its worker, which runs in its own session
        proc.wait(timeout=10)
        pid = int((tmp_path / "home" / "demo" / "worker.pid").read_text())
        assert pid_alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = kill_left_worker(tmp_path / "home")
    assert left and not pid_alive(pid)


def test_the_orders_example_refunds_an_order_it_cannot_ship(
    tmp_path: Path, worker_factory: WorkerFactory
) -> None:
    env = {
        **os.environ,
        "SAGALINE_HOME": str(tmp_path),
        "CELERY_BROKER_URL": "",
        "SAGALINE_STORE_URL": "",
    }
    worker = worker_factory("examples.orders.app", env=env, concurrency=2)

    def order(*args: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "examples.orders", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.split()

    assert order("--order-id", "o-1", "--quantity", "2")[1] == "COMPLETED"
    out = order("--order-id", "o-2", "--quantity", "999")
    assert out[1] == "COMPENSATED" and "not in stock" in " ".join(out)

    db = sqlite3.connect(tmp_path / "state.db")
    try:
        assert db.execute(
            "SELECT order_id, status FROM shop_payments ORDER BY order_id"
        ).fetchall() == [("o-1", "charged"), ("o-2", "refunded")]
        assert db.execute("SELECT available FROM shop_stock WHERE sku = 'widget'").fetchone() == (
            98,
        )
        assert db.execute("SELECT order_id FROM shop_emails").fetchall() == [("o-1",)]
        # The steps' order.* events, committed with their steps (no route set: pending).
        assert db.execute("SELECT key, topic FROM sagaline_outbox ORDER BY id").fetchall() == [
            ("o-1", "order.charged"),
            ("o-1", "order.confirmed"),
            ("o-2", "order.charged"),
            ("o-2", "order.refunded"),
        ]
    finally:
        db.close()
        stop_gracefully(worker)


def stop_gracefully(worker: WorkerProcess) -> None:
    """SIGTERM to the main process only: a warm shutdown stops the pool by itself."""
    os.kill(worker.pid, signal.SIGTERM)
    wait_until(lambda: not worker.is_running(), timeout=20, what="worker warm shutdown")
    worker.stop()
