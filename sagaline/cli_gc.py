"""`sagaline gc`: retention run by hand (or by cron), thin over `ops.gc`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from . import ops
from .cli_support import (
    _console,
    _errors,
    _json,
    app_runtime,
    parse_statuses,
    reading,
    store_option,
)
from .config import parse_duration
from .ops import DEFAULT_GC_BATCH, MAX_GC_BATCH, GcReport


def gc(
    older_than: str = typer.Option(
        ..., "--older-than", help="Sagas that ended longer ago than this: 3600, 12h, 30d, 2w."
    ),
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            "-s",
            help="Finished statuses to delete, repeatable (default: completed and compensated).",
        ),
    ] = None,
    name: str | None = typer.Option(None, "--name", help="Only sagas of this name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
    batch_size: int = typer.Option(
        DEFAULT_GC_BATCH, min=1, max=MAX_GC_BATCH, help="Sagas per transaction."
    ),
    as_json: bool = typer.Option(False, "--json", help="The report as one JSON document."),
    app: str | None = typer.Option(
        None, "-A", "--app", help="Your Celery app's module: its store (instead of --store)."
    ),
    store: str | None = store_option(),
) -> None:
    """Delete finished sagas that ended before a cutoff, with their steps and history.

    A child saga goes with its parent, and a parent whose child saga still runs is kept.
    FAILED sagas wait for an operator: they go only with --status failed.
    """
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    statuses = parse_statuses(status)
    with _errors():
        if app is not None:
            report = ops.gc(
                age,
                status=statuses,
                name=name,
                dry_run=dry_run,
                batch_size=batch_size,
                runtime=app_runtime(app, store),
            )
        else:
            with reading(store) as target:
                report = ops.gc(
                    age,
                    status=statuses,
                    name=name,
                    dry_run=dry_run,
                    batch_size=batch_size,
                    store=target,
                )
    if as_json:
        typer.echo(_json(report.as_dict()))
        return
    _print(report)


def _print(report: GcReport) -> None:
    console = _console()
    verb = "would delete" if report.dry_run else "deleted"
    table = Table(header_style="bold")
    table.add_column("status", no_wrap=True)
    table.add_column(verb, justify="right")
    for status in sorted({*report.statuses, *report.sagas}):
        table.add_row(status.value, str(report.sagas.get(status, 0)))
    console.print(table)
    ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.cutoff))
    console.print(
        f"{'dry run: ' if report.dry_run else ''}{verb} {report.total} saga(s), "
        f"{report.steps} step(s), {report.events} event(s) that ended before {ended} "
        f"({report.batches} batch(es))"
    )
    if report.kept:
        console.print(
            Text(f"kept {report.kept} saga(s) whose child sagas are not finished", style="dim")
        )
    if report.partitions:
        # Their events were dropped with the month, not counted one by one above.
        console.print(f"dropped event partitions: {', '.join(report.partitions)}")


def register(cli: typer.Typer) -> None:
    cli.command("gc")(gc)
