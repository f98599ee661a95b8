"""The `sagaline` command: thin over ops.py (worker, demo, ls, show, cancel, resume, sweep, db);
`gc` is in cli_gc.py, `relay` and `outbox` in cli_outbox.py.

Exit statuses: 0 done; 1 a saga error; 2 no such saga, or a usage error;
3 the store is unreachable; 4 the saga's status does not allow the operation.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from . import cli_gc, cli_outbox, ops
from .cli_support import EXIT_ERROR as EXIT_ERROR
from .cli_support import EXIT_NOT_ALLOWED as EXIT_NOT_ALLOWED
from .cli_support import EXIT_NOT_FOUND as EXIT_NOT_FOUND
from .cli_support import EXIT_STORE as EXIT_STORE
from .cli_support import STORE_WAIT as STORE_WAIT
from .cli_support import (
    _console,
    _errors,
    _fail,
    _json,
    _when,
    app_runtime,
    parse_statuses,
    parse_time,
    reading,
    store_option,
)
from .config import default_store_url
from .observability import health as probes
from .ops import cut_deep as cut_deep
from .ops import redact
from .records import SagaFilter
from .timeline import format_duration, render_steps, render_summary, render_timeline, status_text
from .web.command import web_command

cli = typer.Typer(
    name="sagaline",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Sagas on Celery: run a worker, try the demo, inspect and operate sagas.",
)
db_cli = typer.Typer(no_args_is_help=True, help="The state store's schema.")
cli.add_typer(db_cli, name="db")

StoreOption = store_option()
AppOption = typer.Option(
    ..., "-A", "--app", help="Module of your Celery app (it calls sagaline.init_app)."
)


def main() -> None:
    cli()


@cli.callback()
def _setup() -> None:
    # The store logs each retry as a warning; with no logging configured Python would
    # print them on stderr. The error that ends the retries is reported by _errors().
    # (`sagaline worker` gets Celery's logging, which shows them.)
    logging.getLogger("sagaline").addHandler(logging.NullHandler())


# -- commands ------------------------------------------------------------------------------


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    app: str = AppOption,
    log_format: str | None = typer.Option(
        None,
        "--log-format",
        help="plain (Celery's format) or json: one JSON object per line, with the "
        "saga, step and trace of each record (SAGALINE_LOG_FORMAT).",
    ),
) -> None:
    """Run a Celery worker (with the sagaline sweeper) for your app.

    Any other option goes to `celery worker`, e.g. `sagaline worker -A shop.app -c 4`.
    """
    if log_format is not None:
        os.environ["SAGALINE_LOG_FORMAT"] = log_format  # read by init_app, in the import
    with _errors():
        celery_app = app_runtime(app).app
    code = celery_app.start(argv=["worker", *ctx.args])
    raise typer.Exit(code or 0)


@cli.command()
def demo(
    runs: int = typer.Option(8, min=1, max=64, help="How many sagas to run."),
    concurrency: int = typer.Option(4, min=1, help="Worker processes."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the sagas to end."),
    fail_at: str | None = typer.Option(None, help="Every run fails at this step."),
    fail_rate: float | None = typer.Option(
        None, min=0.0, max=1.0, help="Each step attempt fails with this chance."
    ),
    seed: int = typer.Option(7, help="Seed of --fail-rate (run i uses seed + i)."),
    slow: Annotated[
        list[str] | None, typer.Option(help="STEP=SECONDS: that step takes longer.")
    ] = None,
) -> None:
    """Run the robot exploration saga several times on a real worker, then show what happened.

    Needs no configuration: SQLite state and a server-less broker in
    $SAGALINE_HOME/demo. With CELERY_BROKER_URL and SAGALINE_STORE_URL it uses them.
    """
    from .demo.runner import DemoOptions, run_demo

    delays: dict[str, float] = {}
    for item in slow or []:
        step, _, seconds = item.partition("=")
        try:
            delays[step.strip()] = float(seconds)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not STEP=SECONDS", param_hint="--slow") from None
    options = DemoOptions(
        runs=runs,
        concurrency=concurrency,
        timeout=timeout,
        fail_at=fail_at,
        fail_rate=fail_rate,
        seed=seed,
        slow=delays,
    )
    console = _console()
    with _errors():
        try:
            code = run_demo(options, console)
        except ValueError as exc:  # an unknown step in the failure injection
            _fail(str(exc), EXIT_NOT_FOUND)
        except KeyboardInterrupt:
            console.print("interrupted; the worker was stopped.")
            code = 130
    raise typer.Exit(code)


@cli.command("ls")
def list_command(
    status: Annotated[
        list[str] | None, typer.Option("--status", "-s", help="Only these statuses (repeatable).")
    ] = None,
    name: str | None = typer.Option(None, "--name", help="Only sagas of this name."),
    since: str | None = typer.Option(None, help="Created at or after: ISO time or 10m/2h/1d."),
    until: str | None = typer.Option(None, help="Created before: ISO time or 10m/2h/1d."),
    limit: int = typer.Option(50, min=1, max=10000),
    offset: int = typer.Option(0, min=0),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    store: str | None = StoreOption,
) -> None:
    """List sagas, newest first."""
    statuses = parse_statuses(status)
    after = parse_time(since) if since else None
    before = parse_time(until) if until else None
    with _errors(), reading(store) as target:
        views = ops.find_sagas(
            target,
            SagaFilter(
                status=statuses,
                name=name,
                created_after=after,
                created_before=before,
                limit=limit,
                offset=offset,
            ),
        )
    if as_json:
        for view in views:
            typer.echo(_json(ops.summary_as_dict(view)))
        return
    table = Table(header_style="bold")
    table.add_column("saga id", no_wrap=True, min_width=36)
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=11)
    table.add_column("created", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("failed step", no_wrap=True)
    console = _console()
    room = console.width - 125  # what the other columns leave; `show` prints the cause whole
    if room >= 20:
        table.add_column("cause", no_wrap=True, overflow="ellipsis", max_width=room)
    for view in views:
        saga, end = view.saga, view.saga.finished_at
        cells: list[str | Text] = [
            saga.saga_id,
            saga.name,
            status_text(saga.status),
            _when(saga.created_at),
            format_duration((end or time.time()) - saga.created_at),
            saga.failed_step or "",
            ops.failure_summary(saga, view.steps) or "",
        ]
        table.add_row(*cells[: len(table.columns)])
    console.print(table)
    more = f"; next page: --offset {offset + len(views)}" if len(views) == limit else ""
    console.print(Text(f"{len(views)} saga(s) from offset {offset}{more}", style="dim"))


@cli.command()
def show(
    saga_id: str = typer.Argument(..., help="The saga's id."),
    as_json: bool = typer.Option(False, "--json", help="Everything as one JSON document."),
    store: str | None = StoreOption,
) -> None:
    """A saga's steps (status, attempts, durations, errors, compensations) and its timeline."""
    with _errors(), reading(store) as target:
        view = ops.read_saga(target, saga_id)
    if as_json:
        typer.echo(_json(ops.view_as_dict(view), indent=2))
        return
    console = _console()
    console.print(render_summary(view))
    console.print(render_steps(view))
    console.print(render_timeline(view))


@cli.command()
def cancel(
    saga_id: str = typer.Argument(..., help="The saga's id."),
    app: str = AppOption,
    reason: str = typer.Option("cancelled by operator", help="Recorded as the cause."),
) -> None:
    """Stop a running saga and compensate what it applied."""
    with _errors():
        saga = ops.cancel(saga_id, reason=reason, runtime=app_runtime(app), actor="cli")
    typer.echo(f"saga {saga.saga_id}: {saga.status.value} (cancel: {reason})")


@cli.command()
def resume(
    saga_id: str = typer.Argument(..., help="The saga's id."),
    app: str = AppOption,
) -> None:
    """Retry the unfinished compensations (or forward steps) of a FAILED saga."""
    with _errors():
        saga = ops.resume(saga_id, runtime=app_runtime(app), actor="cli")
    typer.echo(f"saga {saga.saga_id}: {saga.status.value} (resumed)")


@cli.command()
def sweep(
    app: str = AppOption,
    limit: int = typer.Option(200, min=1, help="At most this many items."),
) -> None:
    """One pass of the sweeper: re-publish lost messages, fail expired leases, enforce deadlines.

    Workers run it every few seconds by themselves; this is for operators and cron.
    """
    with _errors():
        report = ops.sweep_report(app_runtime(app), limit=limit)
    for item in report.repaired:
        what = f"step {item.step}" if item.step else "deadline / grace period"
        typer.echo(
            f"{item.kind.value}: saga {item.saga_id} {what} "
            f"(due for {max(0.0, time.time() - item.due_at):.1f}s)"
        )
    for failed in report.failed:
        typer.echo(f"not repaired (see the log): saga {failed.saga_id}")
    typer.echo(f"sweep: {report.due} item(s) due, {report.acted} repaired")


@cli.command()
def health(
    liveness: bool = typer.Option(False, "--liveness", help="Heartbeat file age only."),
    readiness: bool = typer.Option(False, "--readiness", help="Store and broker answer."),
    app: str | None = typer.Option(None, "-A", "--app", help="Your Celery app's module."),
    max_age: float = typer.Option(60.0, min=1.0, help="Liveness: oldest heartbeat, in s."),
    timeout: float = typer.Option(probes.READINESS_TIMEOUT, min=0.1, help="Readiness: s."),
) -> None:
    """Probe a worker: exit 0 healthy, 1 unhealthy, 2 bad usage (see the README)."""
    if liveness == readiness or (readiness and not app):
        _fail("give --liveness, or --readiness with -A/--app", probes.EXIT_USAGE)
    with _errors():
        ok, message = probes.probe(app_runtime(app) if app else None, readiness, max_age, timeout)
    typer.echo(message, err=not ok)
    raise typer.Exit(probes.EXIT_HEALTHY if ok else probes.EXIT_UNHEALTHY)


cli.command("web")(web_command(_errors, app_runtime, reading))


@db_cli.command("upgrade")
def db_upgrade(store: str | None = StoreOption) -> None:
    """Create or upgrade the store's schema to this version of sagaline."""
    url = store or default_store_url()
    with _errors():
        ops.migrate(url, give_up_after=STORE_WAIT)
    typer.echo(f"store {redact(url)}: schema up to date")


cli_gc.register(cli)
cli_outbox.register(cli, app_runtime)
