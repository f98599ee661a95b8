"""Retention end to end: the `sagaline gc` command, `sagaline.gc`, and a real worker's
sweeper applying SAGALINE_RETENTION (the store side is in test_store_gc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

import sagaline
from sagaline.cli import cli
from sagaline.config import Settings, parse_duration
from sagaline.exceptions import ConfigurationError, InputError
from sagaline.records import Decision, Event, SagaState
from sagaline.states import SagaStatus, StepStatus
from sagaline.stores import Store, store_from_url
from tests.harness import REPO_ROOT, WorkerProcess, wait_until
from tests.integration.conftest import cluster_store_url
from tests.integration.test_cli import SAGALINE, fleet_env, runner
from tests.integration.test_demo import stop_gracefully
from tests.stores import make_state

pytestmark = pytest.mark.timeout(120)

DAY = 86400.0


def stored(
    st: Store,
    status: SagaStatus,
    ended_at: float | None,
    *,
    name: str = "orders",
    created_at: float | None = None,
) -> str:
    """A saga in `status` that ended at `ended_at` (None: still running)."""
    created = created_at or (ended_at or time.time()) - 60
    state = make_state(name=name, created_at=created, step_due=created + 365 * DAY)
    sid = state.saga.saga_id
    st.create_saga(state, [Event(sid, "saga_started", created)])
    if ended_at is None:
        return sid

    def finish(s: SagaState) -> Decision:
        saga = replace(s.saga, status=status, finished_at=ended_at, updated_at=ended_at)
        steps = [replace(r, status=StepStatus.SUCCEEDED, due_at=None) for r in s.steps.values()]
        return Decision(
            saga=saga,
            saga_version=s.saga.version,
            steps=steps,
            step_versions={r.name: r.version for r in s.steps.values()},
            events=[Event(sid, "saga_completed", ended_at)],
        )

    st.transact(sid, finish)
    return sid


def sagaline_cmd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SAGALINE, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gc_command_counts_first_then_deletes_what_it_counted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    env = {
        **os.environ,
        "COLUMNS": "200",
        "SAGALINE_STORE_URL": url,
        "SAGALINE_HOME": str(tmp_path / "home"),
        "CELERY_BROKER_URL": "",
    }
    st = store_from_url(url)
    old = time.time() - 40 * DAY
    try:
        done = [stored(st, SagaStatus.COMPLETED, old) for _ in range(3)]
        compensated = stored(st, SagaStatus.COMPENSATED, old)
        failed = stored(st, SagaStatus.FAILED, old)
        other = stored(st, SagaStatus.COMPLETED, old, name="invoices")
        recent = stored(st, SagaStatus.COMPLETED, time.time() - DAY)
        running = stored(st, SagaStatus.RUNNING, None, created_at=old)
    finally:
        st.close()

    dry = sagaline_cmd("gc", "--older-than", "30d", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    counted = json.loads(dry.stdout)
    assert counted["dry_run"] is True
    assert counted["by_status"] == {"COMPENSATED": 1, "COMPLETED": 4}
    assert (counted["sagas"], counted["steps"]) == (5, 15)

    # -A: the store of the app's runtime (here, SAGALINE_STORE_URL's).
    named = sagaline_cmd(
        "gc", "--older-than", "30d", "--name", "invoices", "-A", "examples.robots.app", env=env
    )
    assert named.returncode == 0, named.stderr
    assert "deleted 1 saga(s), 3 step(s), 2 event(s)" in named.stdout
    assert "COMPLETED" in named.stdout and "Traceback" not in named.stderr

    real = sagaline_cmd("gc", "--older-than", "30d", "--batch-size", "2", "--json", env=env)
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert report["by_status"] == {"COMPENSATED": 1, "COMPLETED": 3}
    assert report["batches"] == 2 and report["dry_run"] is False

    # The rest in this process (each real command costs a second of imports).
    failed_too = runner.invoke(cli, ["gc", "--older-than", "30d", "-s", "failed", "--store", url])
    assert failed_too.exit_code == 0 and "deleted 1 saga(s)" in failed_too.stdout

    st = store_from_url(url)
    try:
        gone = [*done, compensated, failed, other]
        assert [sid for sid in gone if st.get_saga(sid) is not None] == []
        assert st.get_saga(recent) is not None and st.get_saga(running) is not None
    finally:
        st.close()

    bad = runner.invoke(cli, ["gc", "--older-than", "soon", "--store", url])
    assert bad.exit_code == 2 and "'soon' is not a duration" in bad.stderr
    refused = runner.invoke(cli, ["gc", "--older-than", "1d", "-s", "running", "--store", url])
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "error: gc deletes finished sagas only (compensated, completed, failed), not RUNNING"
    )
    missing = runner.invoke(cli, ["gc", "--older-than", "1d", "--store", f"sqlite:///{tmp_path}/x"])
    assert missing.exit_code == 3 and not (tmp_path / "x").exists()


def test_gc_command_on_a_redis_cluster_store(request: pytest.FixtureRequest) -> None:
    url = cluster_store_url(request)  # the private cluster, its default prefix emptied
    st = store_from_url(url)
    old = time.time() - 40 * DAY
    try:
        done = [stored(st, SagaStatus.COMPLETED, old) for _ in range(5)]
        failed = stored(st, SagaStatus.FAILED, old)
        recent = stored(st, SagaStatus.COMPLETED, time.time() - DAY)
        dry = runner.invoke(
            cli, ["gc", "--older-than", "30d", "--dry-run", "--json", "--store", url]
        )
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout)["by_status"] == {"COMPENSATED": 0, "COMPLETED": 5}
        real = runner.invoke(
            cli, ["gc", "--older-than", "30d", "--batch-size", "2", "--store", url]
        )
        assert real.exit_code == 0 and "deleted 5 saga(s), 15 step(s)" in real.stdout
        assert [sid for sid in done if st.get_saga(sid) is not None] == []
        assert st.get_saga(failed) is not None and st.get_saga(recent) is not None
    finally:
        st.close()


def test_python_gc_takes_durations_and_refuses_bad_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    st = store_from_url(url)
    try:
        sid = stored(st, SagaStatus.COMPLETED, time.time() - 2 * DAY)
        assert sagaline.gc("3d", store=st).total == 0
        assert sagaline.gc(2 * DAY - 60, store=url, dry_run=True).total == 1
        report = sagaline.gc("1d", store=st)
        assert report.sagas == {SagaStatus.COMPLETED: 1} and st.get_saga(sid) is None
        with pytest.raises(InputError, match="older_than must be more than 0 s"):
            sagaline.gc(0, store=st)
        with pytest.raises(InputError, match="'a while' is not a duration"):
            sagaline.gc("a while", store=st)
    finally:
        st.close()
    assert parse_duration("30d") == 30 * DAY and parse_duration("90") == 90.0
    assert Settings.from_env(retention="2w").retention == 14 * DAY
    assert Settings.from_env(retention=timedelta(hours=1)).retention == 3600
    with pytest.raises(ConfigurationError, match="retention: 'x' is not a duration"):
        Settings.from_env(retention="x")
    monkeypatch.setenv("SAGALINE_RETENTION", "soon")
    with pytest.raises(ConfigurationError, match="SAGALINE_RETENTION='soon' is not a valid dur"):
        Settings.from_env()


def test_a_worker_with_retention_deletes_finished_sagas_and_keeps_the_others(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    env = {
        **fleet_env(home),
        "SAGALINE_RETENTION": "1s",
        "SAGALINE_SWEEP_INTERVAL": "0.5",
    }
    url = f"sqlite:///{home}/state.db"
    st = store_from_url(url)
    try:
        long_ago = time.time() - 10 * DAY
        old = stored(st, SagaStatus.COMPENSATED, long_ago)
        failed = stored(st, SagaStatus.FAILED, long_ago)
        running = stored(st, SagaStatus.RUNNING, None, created_at=long_ago)
        worker = WorkerProcess("examples.robots.app", env=env, workdir=tmp_path / "worker")
        worker.start()
        try:
            run = subprocess.run(
                [sys.executable, "-m", "examples.robots", "--runs", "2"],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            lines = [line.split() for line in run.stdout.splitlines()]
            assert [words[-1] for words in lines] == ["COMPLETED", "COMPLETED"], run.stdout
            ran = [words[0] for words in lines]
            gone = [old, *ran]
            wait_until(
                lambda: all(st.get_saga(sid) is None for sid in gone),
                timeout=20,
                what="the sweeper deleting finished sagas",
            )
            assert st.get_saga(failed) is not None and st.get_saga(running) is not None
            assert "retention: deleted" in worker.log_text()
        finally:
            stop_gracefully(worker)
    finally:
        st.close()
