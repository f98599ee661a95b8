"""`sagaline demo`: the robot exploration saga, run several times by a real worker process.

With no configuration everything lives in a fresh `$SAGALINE_HOME/demo`
(SQLite state, the filesystem broker, the worker's log), wiped at the start so
old state never interferes and kept afterwards for `sagaline ls` / `show`.
With CELERY_BROKER_URL and SAGALINE_STORE_URL the same runs go through them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..config import default_home
from ..exceptions import ConfigurationError
from ..ops import SagaView, get_saga, redact, short_name
from ..states import SAGA_TERMINAL, EventKind, SagaStatus
from ..testing import HarnessError, WorkerExited, WorkerProcess
from ..timeline import format_duration, render_timeline, status_text

# The saga ships in the package: the worker imports it from wherever sagaline is installed.
APP_MODULE = "sagaline.demo.robots.app"
WORKER_READY_TIMEOUT = 60.0


@dataclass
class DemoOptions:
    runs: int = 8
    concurrency: int = 4
    timeout: float = 60.0
    # Failure injection for every run; without any, a scripted mix of failures is used.
    fail_at: str | None = None
    fail_rate: float | None = None
    seed: int = 7
    slow: dict[str, float] = field(default_factory=dict)

    @property
    def scripted(self) -> bool:
        return self.fail_at is None and self.fail_rate is None and not self.slow


@dataclass
class Run:
    number: int
    what: str
    input: dict[str, Any]
    saga_id: str = ""
    view: SagaView | None = None


def scripted_injection(i: int, seed: int) -> tuple[str, dict[str, Any]]:
    """The default mix: runs 0 and 4 are clean, run 3 fails at the last step (so every
    compensation runs), run 5 early, run 7 exhausts its retries; others retry or gamble."""
    script: list[tuple[str, dict[str, Any]]] = [
        ("none", {}),
        ("explore_area flaky once (retried)", {"flaky": {"explore_area": 1}}),
        ("fail_rate 0.3", {"fail_rate": 0.3, "seed": seed + i}),
        ("fail_at integrate_maps", {"fail_at": "integrate_maps"}),
        ("slow explore_area 0.5s", {"slow": {"explore_area": 0.5}}),
        ("fail_at plan_route", {"fail_at": "plan_route"}),
        ("fail_rate 0.3", {"fail_rate": 0.3, "seed": seed + i}),
        ("plan_route link down (retries exhausted)", {"flaky": {"plan_route": 3}}),
    ]
    return script[i % len(script)]


def plan_runs(opts: DemoOptions, make_input: Any) -> list[Run]:
    runs = []
    for i in range(opts.runs):
        if opts.scripted:
            what, injection = scripted_injection(i, opts.seed)
        else:
            injection = {
                "fail_at": opts.fail_at,
                "fail_rate": opts.fail_rate or 0.0,
                "seed": opts.seed + i,
                "slow": opts.slow,
            }
            what = (
                ", ".join(
                    p
                    for p in (
                        f"fail_at {opts.fail_at}" if opts.fail_at else "",
                        f"fail_rate {opts.fail_rate:g}" if opts.fail_rate else "",
                        " ".join(f"slow {k} {v:g}s" for k, v in opts.slow.items()),
                    )
                    if p
                )
                or "none"
            )
        runs.append(Run(i + 1, what, make_input(f"sector-{i + 1}", 2 + i % 2, **injection)))
    return runs


def demo_worker(home: Path, concurrency: int) -> WorkerProcess:
    """`celery -A sagaline.demo.robots.app worker`, its log, ready and pid files in `home`."""
    # cwd is the demo's own folder: nothing of the user's current directory (a stray
    # celeryconfig.py, a module named like ours) leaks into the worker.
    return WorkerProcess(
        APP_MODULE,
        env={"SAGALINE_HOME": str(home)},
        pool="prefork",
        concurrency=concurrency,
        name=f"demo-{os.getpid()}",
        cwd=home,
        workdir=home,
        ready_timeout=WORKER_READY_TIMEOUT,
    )


def _start(worker: WorkerProcess) -> None:
    try:
        worker.start()
    except WorkerExited:
        raise ConfigurationError(
            f"the demo worker exited with {worker.returncode} "
            f"before it was ready; see {worker.log_path}"
        ) from None
    except HarnessError:
        raise ConfigurationError(
            f"the demo worker was not ready after {WORKER_READY_TIMEOUT:g}s; see {worker.log_path}"
        ) from None


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the worker is stopped either way."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(opts: DemoOptions, console: Console) -> int:
    """Run the demo; returns the exit status (0: every saga ended and no robot leaked)."""
    home = default_home() / "demo"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    broker = os.environ.get("CELERY_BROKER_URL") or "the filesystem broker in " + str(home)
    store = os.environ.get("SAGALINE_STORE_URL") or f"sqlite:///{home / 'state.db'}"
    console.print(
        Text.assemble(
            ("sagaline demo", "bold"),
            f": {opts.runs} robot exploration sagas\n  broker: {broker}\n  store:  {redact(store)}",
        )
    )
    worker = demo_worker(home, opts.concurrency)
    with _environment(SAGALINE_HOME=str(home)), _terminate_as_interrupt():
        try:
            with console.status("starting a Celery worker process..."):
                _start(worker)
            console.print(
                f"  worker: pid {worker.pid}, {opts.concurrency} processes, log {worker.log_path}"
            )
            code = _run_sagas(opts, console)
        except BaseException:
            # Interrupted or broken: steps may be running; do not wait for them.
            worker.stop(timeout=3.0)
            raise
        worker.stop()
    console.print(
        f"worker stopped. State kept in {home}: try [bold]SAGALINE_HOME={home} sagaline ls[/bold]"
        if "SAGALINE_STORE_URL" not in os.environ
        else "worker stopped."
    )
    return code


def _run_sagas(opts: DemoOptions, console: Console) -> int:
    # Imported here, under SAGALINE_HOME=<demo home>: the app reads it when it is created.
    from .robots import models, sagas
    from .robots.app import app

    runtime = app._sagaline_runtime
    models.engine()  # the fleet's tables exist before the first step needs them
    runs = plan_runs(opts, sagas.exploration_input)
    started = time.monotonic()
    for run in runs:
        run.saga_id = sagas.exploration.run(**run.input).saga_id

    pending = {run.saga_id: run for run in runs}
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} ended"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("running sagas", total=len(runs))
        while pending and time.monotonic() - started < opts.timeout:
            for saga_id in list(pending):
                view = get_saga(saga_id, runtime=runtime, with_history=False)
                if view.status in SAGA_TERMINAL:
                    pending.pop(saga_id)
                    progress.advance(bar)
            done = [r for r in runs if r.saga_id not in pending]
            progress.update(bar, description=_counts(runs, done, runtime))
            time.sleep(0.1)
    for run in runs:
        run.view = get_saga(run.saga_id, runtime=runtime)
    console.print(_summary(runs, time.monotonic() - started))

    labels = {
        s.name: short_name(str(s.compensation_name))
        for s in sagas.exploration.steps
        if s.compensation_name
    }
    for title, chosen in (
        ("a completed saga", _pick_completed(runs)),
        ("a compensated saga", _pick_compensated(runs)),
    ):
        if chosen is not None and chosen.view is not None:
            console.print()
            console.print(
                Text(f"Timeline of {title} (run {chosen.number}: {chosen.what})", style="bold")
            )
            console.print(render_timeline(chosen.view, compact=True, labels=labels))

    ok = _check_robots(runs, models, console)
    if pending:
        console.print(
            Text(
                f"✗ {len(pending)} saga(s) did not end within {opts.timeout:g}s: "
                + ", ".join(pending),
                style="bold red",
            )
        )
        ok = False
    return 0 if ok else 1


def _counts(runs: list[Run], done: list[Run], runtime: Any) -> str:
    statuses = [get_saga(r.saga_id, runtime=runtime, with_history=False).status for r in done]
    completed = sum(s is SagaStatus.COMPLETED for s in statuses)
    compensated = sum(s is SagaStatus.COMPENSATED for s in statuses)
    return f"{completed} completed, {compensated} compensated, {len(runs) - len(done)} running"


def _summary(runs: list[Run], elapsed: float) -> Table:
    table = Table(
        title=f"{len(runs)} sagas in {elapsed:.1f}s", title_justify="left", header_style="bold"
    )
    table.add_column("#", justify="right")
    table.add_column("saga id", no_wrap=True)
    table.add_column("status")
    table.add_column("duration", justify="right")
    table.add_column("failed step")
    table.add_column("injected")
    for run in runs:
        assert run.view is not None
        saga = run.view.saga
        end = saga.finished_at
        table.add_row(
            str(run.number),
            saga.saga_id,
            status_text(saga.status),
            format_duration(end - saga.created_at if end else None),
            saga.failed_step or "",
            run.what,
        )
    return table


def _pick_completed(runs: list[Run]) -> Run | None:
    completed = [r for r in runs if r.view and r.view.status is SagaStatus.COMPLETED]
    # One that needed a retry shows more: a failed attempt, then success.
    retried = [r for r in completed if r.view and any(s.attempt > 1 for s in r.view.steps)]
    candidates = retried or completed
    return candidates[0] if candidates else None


def _pick_compensated(runs: list[Run]) -> Run | None:
    compensated = [r for r in runs if r.view and r.view.status is SagaStatus.COMPENSATED]
    if not compensated:
        return None
    # The one that undid the most steps.
    return max(
        compensated,
        key=lambda r: sum(
            e.kind == EventKind.COMPENSATION_SUCCEEDED for e in (r.view.history if r.view else [])
        ),
    )


def _check_robots(runs: list[Run], models: Any, console: Console) -> bool:
    compensated = [r.saga_id for r in runs if r.view and r.view.status is SagaStatus.COMPENSATED]
    held = models.robots_held_by(compensated)
    fleet = models.fleet()
    state = ", ".join(f"{n} {status}" for status, n in sorted(fleet.items()))
    console.print()
    if held:
        robots = ", ".join(f"{r['name']} (saga {r['assigned_saga']})" for r in held)
        console.print(
            Text(
                f"✗ robot check: {len(held)} robot(s) still allocated by a "
                f"compensated saga: {robots}",
                style="bold red",
            )
        )
        return False
    console.print(
        Text(
            f"✓ robot check: no robot is left allocated by the {len(compensated)} "
            f"compensated saga(s) (fleet: {state})",
            style="bold green",
        )
    )
    return True
