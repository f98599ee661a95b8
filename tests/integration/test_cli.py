"""The `sagaline` CLI against sagas that a real worker process ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sagaline.cli import cli, cut_deep, parse_time
from sagaline.records import Event, SagaFilter, SagaRecord, SagaState, StepRecord
from sagaline.states import SagaStatus, StepStatus
from sagaline.stores import store_from_url
from tests.harness import REPO_ROOT, WorkerProcess, wait_until
from tests.integration.test_demo import stop_gracefully

pytestmark = pytest.mark.timeout(240)

SAGALINE = str(Path(sys.executable).parent / "sagaline")
APP = "examples.robots.app"
UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
runner = CliRunner()


@dataclass
class Fleet:
    """A SAGALINE_HOME (filesystem broker + SQLite) served by one real worker."""

    home: Path
    env: dict[str, str]

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.home}/state.db"

    def run(self, *args: str) -> list[tuple[str, str]]:
        """Start exploration sagas in another process and wait: [(saga_id, status)]."""
        proc = subprocess.run(
            [sys.executable, "-m", "examples.robots", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [(line.split()[0], line.split()[-1]) for line in proc.stdout.splitlines()]

    def sagaline(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SAGALINE, *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ids(self, *statuses: SagaStatus) -> set[str]:
        store = store_from_url(self.store_url)
        try:
            flt = SagaFilter(status=list(statuses) or None, limit=100_000)
            return {s.saga_id for s in store.list_sagas(flt)}
        finally:
            store.close()


def fleet_env(home: Path) -> dict[str, str]:
    # Empty values count as unset: the embedded broker and store in this home.
    return {
        **os.environ,
        "SAGALINE_HOME": str(home),
        "CELERY_BROKER_URL": "",
        "SAGALINE_STORE_URL": "",
        "COLUMNS": "200",
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("cli-home")
    env = fleet_env(home)
    worker = WorkerProcess(APP, env=env, concurrency=2, workdir=home / "worker")
    worker.start()
    try:
        yield Fleet(home, env)
    finally:
        stop_gracefully(worker)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


# -- show ----------------------------------------------------------------------------------


def test_show_lists_every_attempt_of_a_retried_step_with_its_error(fleet: Fleet) -> None:
    [(saga_id, status)] = fleet.run("--flaky", "explore_area=2")
    assert status == "COMPLETED"

    code, out, err = invoke("show", saga_id, "--store", fleet.store_url)
    assert code == 0, err
    for attempt in (1, 2):
        assert (
            f"attempt {attempt} failed: ConnectionError: explore_area: robot link dropped "
            f"(injected, attempt {attempt})"
        ) in out
    assert "succeeded (attempt 3)" in out
    assert (
        out.index("attempt 1 failed")
        < out.index("attempt 2 failed")
        < out.index("succeeded (attempt 3)")
    )
    row = next(line for line in out.splitlines() if line.startswith("│ explore_area"))
    assert "SUCCEEDED" in row and "│ 3 " in row

    code, out, _ = invoke("show", saga_id, "--json", "--store", fleet.store_url)
    doc = json.loads(out)
    assert doc["saga"]["status"] == "COMPLETED"
    explore = [a for a in doc["attempts"] if a["step"] == "explore_area"]
    assert [(a["attempt"], a["outcome"]) for a in explore] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert explore[0]["error"].startswith("ConnectionError: explore_area: robot link dropped")
    assert explore[2]["error"] is None and explore[2]["duration"] >= 0


def test_show_of_a_compensated_saga_lists_compensations_last_step_first(fleet: Fleet) -> None:
    [(saga_id, status)] = fleet.run("--fail-at", "explore_area")
    assert status == "COMPENSATED"
    code, out, _ = invoke("show", saga_id, "--store", fleet.store_url)
    assert code == 0
    undone = [
        line.split("←")[1].split()[0]
        for line in out.splitlines()
        if "←" in line and "compensated (attempt" in line
    ]
    assert undone == ["explore_area", "plan_route", "allocate_robots"]
    assert "cause at explore_area: StepFailure: explore_area: failed after applying" in out


# -- ls ------------------------------------------------------------------------------------


def test_ls_status_compensated_lists_exactly_the_compensated_sagas(fleet: Fleet) -> None:
    results = fleet.run("--runs", "3", "--fail-at", "plan_route")
    results += fleet.run("--runs", "2")
    assert sorted(s for _, s in results) == ["COMPENSATED"] * 3 + ["COMPLETED"] * 2

    expected = fleet.ids(SagaStatus.COMPENSATED)
    for spelling in ("compensated", "COMPENSATED", "Compensated"):
        code, out, err = invoke(
            "ls", "--status", spelling, "--json", "--limit", "1000", "--store", fleet.store_url
        )
        assert code == 0, err
        listed = [json.loads(line) for line in out.splitlines()]
        assert {s["saga_id"] for s in listed} == expected
        assert len(listed) == len(expected)
        assert {s["status"] for s in listed} == {"COMPENSATED"}

    code, out, _ = invoke("ls", "-s", "compensated", "--limit", "1000", "--store", fleet.store_url)
    assert code == 0
    assert all(saga_id in out for saga_id in expected)
    assert not any(saga_id in out for saga_id in fleet.ids(SagaStatus.COMPLETED))


def test_ls_filters_by_name_and_time_and_pages(fleet: Fleet) -> None:
    fleet.run("--runs", "3")
    every = fleet.ids()

    def listed(*args: str) -> list[str]:
        code, out, err = invoke("ls", "--json", "--store", fleet.store_url, *args)
        assert code == 0, err
        return [json.loads(line)["saga_id"] for line in out.splitlines()]

    assert set(listed("--limit", "1000", "--name", "robot_exploration")) == every
    assert listed("--name", "no_such_saga") == []
    assert set(listed("--limit", "1000", "--since", "1h")) == every
    assert listed("--until", "1h") == []
    tomorrow = (datetime.now() + timedelta(days=1)).isoformat(timespec="seconds")
    assert listed("--since", tomorrow) == []
    newest_first = listed("--limit", "1000")
    assert listed("--limit", "2") == newest_first[:2]
    assert listed("--limit", "2", "--offset", "2") == newest_first[2:4]
    _, out, _ = invoke("ls", "--limit", "2", "--store", fleet.store_url)
    assert "next page: --offset 2" in out


def test_ls_refuses_an_unknown_status() -> None:
    code, _, err = invoke("ls", "--status", "sleeping", "--store", "memory://")
    assert code == 2
    assert "unknown status 'sleeping'" in err


def test_parse_time_takes_relative_and_iso_times() -> None:
    now = 1_700_000_000.0
    assert parse_time("10m", now) == now - 600
    assert parse_time("2h", now) == now - 7200
    assert parse_time("1d", now) == now - 86400
    assert (
        parse_time("2024-01-02T03:04:05+00:00")
        == datetime.fromisoformat("2024-01-02T03:04:05+00:00").timestamp()
    )


# -- errors --------------------------------------------------------------------------------


def test_an_unknown_saga_id_is_one_line_and_exit_2(fleet: Fleet) -> None:
    code, out, err = invoke("show", "no-such-saga", "--store", fleet.store_url)
    assert code == 2
    assert err.strip() == "error: no saga with id 'no-such-saga'"
    assert out == ""


def test_an_unreachable_store_is_one_line_fast_and_exit_3() -> None:
    for args in (["ls"], ["show", "some-id"], ["db", "upgrade"]):
        started = time.monotonic()
        code, _, err = invoke(*args, "--store", UNREACHABLE)
        elapsed = time.monotonic() - started
        assert code == 3, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: store postgresql+psycopg://postgres@127.0.0.1:1/x failed")
        assert elapsed < 10, f"{args}: {elapsed:.1f}s"


@pytest.mark.parametrize(
    "command", [["ls"], ["ls", "--json"], ["show", "some-id"], ["show", "some-id", "--json"]]
)
def test_read_only_commands_never_create_a_store(tmp_path: Path, command: list[str]) -> None:
    for path in (tmp_path / "no" / "such" / "dir" / "x.db", tmp_path / "missing.db"):
        url = f"sqlite:///{path}"
        code, out, err = invoke(*command, "--store", url)
        assert (code, out, err.strip()) == (3, "", f"error: no store at {url}")
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for i in range(levels):
        value = {"level": levels - i, "inner": [value]} if i % 2 else [value]
    return value


def test_json_output_prints_any_stored_value_even_deeply_nested(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    store = store_from_url(url)
    try:
        state = SagaState(
            SagaRecord(
                saga_id="deep-1",
                name="deep",
                status=SagaStatus.RUNNING,
                input={"tree": deep(500)},
                fingerprint="f" * 16,
                created_at=1.0,
                updated_at=1.0,
            ),
            {
                "a": StepRecord(
                    "deep-1",
                    "a",
                    0,
                    status=StepStatus.SUCCEEDED,
                    attempt=1,
                    output={"echo": deep(500)},
                )
            },
        )
        store.create_saga(state, [Event("deep-1", "saga_started", 1.0)])
    finally:
        store.close()
    code, out, err = invoke("show", "deep-1", "--json", "--store", url)
    assert code == 0 and "Traceback" not in err, err
    doc = json.loads(out)
    assert doc["saga"]["input"] == {"tree": deep(500)}
    assert doc["steps"][0]["output"] == {"echo": deep(500)}
    code, out, err = invoke("ls", "--json", "--store", url)
    assert code == 0, err
    assert json.loads(out)["input"] == {"tree": deep(500)}


def test_cut_deep_keeps_shallow_levels_and_marks_the_cut() -> None:
    value = {"a": [1, {"b": [2, [3]]}], "z": 0}
    assert cut_deep(value, 3) == {
        "a": [1, {"b": "<list nested deeper than 3 levels: not shown>"}],
        "z": 0,
    }
    assert list(cut_deep(value, 99)) == ["a", "z"] and cut_deep(value, 99) == value


def test_an_unreachable_store_from_a_real_process_prints_no_traceback(fleet: Fleet) -> None:
    proc = fleet.sagaline("ls", "--store", UNREACHABLE)
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# -- operating: cancel, resume, sweep, worker, db ------------------------------------------


def test_cancel_compensates_a_running_saga_and_resume_refuses_it(fleet: Fleet) -> None:
    [(saga_id, _)] = fleet.run("--no-wait", "--slow", "explore_area=6")

    def exploring() -> bool:
        store = store_from_url(fleet.store_url)
        try:
            return any(
                s.name == "explore_area" and s.status.value == "RUNNING"
                for s in store.get_steps(saga_id)
            )
        finally:
            store.close()

    wait_until(exploring, timeout=30, what="explore_area to run")
    proc = fleet.sagaline("cancel", saga_id, "-A", APP, "--reason", "operator test")
    assert proc.returncode == 0, proc.stderr
    assert f"saga {saga_id}: COMPENSATING" in proc.stdout
    wait_until(
        lambda: saga_id in fleet.ids(SagaStatus.COMPENSATED),
        timeout=30,
        what="the cancelled saga to be compensated",
    )
    _, out, _ = invoke("show", saga_id, "--store", fleet.store_url)
    assert "rolling back: operator test" in out

    proc = fleet.sagaline("resume", saga_id, "-A", APP)
    assert proc.returncode == 4
    assert proc.stderr.strip() == f"error: cannot resume saga '{saga_id}': it is COMPENSATED"


def test_cancel_needs_an_app_that_set_up_sagaline(fleet: Fleet) -> None:
    proc = fleet.sagaline("cancel", "x", "-A", "tests.integration.harness_app")
    assert proc.returncode == 1
    assert "did not call sagaline.init_app(app)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sweep_runs_one_pass_and_says_what_it_did(fleet: Fleet) -> None:
    proc = fleet.sagaline("sweep", "-A", APP)
    assert proc.returncode == 0, proc.stderr
    assert "item(s) due" in proc.stdout and "repaired" in proc.stdout


class CliWorker(WorkerProcess):
    """`sagaline worker -A ...` instead of `celery -A ... worker`."""

    @property
    def argv(self) -> list[str]:
        return [
            SAGALINE,
            "worker",
            "-A",
            self.app_module,
            "-P",
            "solo",
            "--loglevel",
            "INFO",
            "-n",
            f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]


def test_worker_command_runs_a_celery_worker_with_the_sweeper(tmp_path: Path) -> None:
    env = fleet_env(tmp_path)
    worker = CliWorker(APP, env=env, workdir=tmp_path / "worker")
    worker.start()
    try:
        assert "sagaline sweeper" in worker.log_text() or worker.is_running()
        fleet = Fleet(tmp_path, env)
        [(_, status)] = fleet.run()
        assert status == "COMPLETED"
    finally:
        worker.stop()
    assert worker.returncode == 0


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    code, out, err = invoke("db", "upgrade", "--store", url)
    assert code == 0, err
    assert "schema up to date" in out
    code, out, _ = invoke("ls", "--store", url)
    assert code == 0 and "0 saga(s)" in out
