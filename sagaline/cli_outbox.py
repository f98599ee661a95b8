"""`sagaline relay` and `sagaline outbox ls / retry` (the transactional outbox)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import typer

from . import ops
from .cli_support import HOME_STORE, store_option
from .config import default_store_url
from .exceptions import SagaError

outbox_cli = typer.Typer(
    no_args_is_help=True, help="The transactional outbox: pending events and dead letters."
)

_HELP = "The database of the outbox (the saga store's SQL URL)."
_Store = store_option(help=_HELP)

# cli.app_runtime, handed over by `register` (the CLI module imports this one).
_app_runtime: Callable[[str, str | None], Any] | None = None


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def relay(
    store: str | None = store_option(f"the app's with -A, else {HOME_STORE}", _HELP),
    route: list[str] = typer.Option(  # noqa: B008 - typer's idiom
        [],
        "--route",
        show_default="$SAGALINE_OUTBOX_ROUTES, else the app's with -A",
        help="topic-pattern=url (repeat; first match wins).",
    ),
    app: str | None = typer.Option(
        None, "-A", "--app", help="Your Celery app's module (for celery:<task> routes)."
    ),
    batch: int = typer.Option(200, min=1, help="Rows per round."),
    max_attempts: int = typer.Option(12, min=1, help="Attempts before a dead letter."),
    backoff: float = typer.Option(0.5, min=0.0, help="First retry delay, doubled per attempt."),
    max_backoff: float = typer.Option(300.0, min=0.0, help="Longest retry delay."),
    metrics_port: int = typer.Option(
        0,
        "--metrics-port",
        envvar="SAGALINE_METRICS_PORT",
        show_envvar=True,
        min=0,
        max=65535,
        help="Serve Prometheus /metrics (the outbox metrics) on this port; 0: off. "
        "Needs the prometheus extra.",
    ),
) -> None:
    """Send committed outbox events to their destinations until stopped (SIGTERM)."""
    celery_app: Any = None
    routes: Any = route or os.environ.get("SAGALINE_OUTBOX_ROUTES", "")
    if app is not None and _app_runtime is not None:
        runtime = _app_runtime(app, store)
        celery_app, store = runtime.app, store or runtime.settings.store_url
        routes = routes or runtime.settings.outbox_routes
        metrics_port = metrics_port or runtime.settings.metrics_port
    if not routes:
        raise _fail(
            ValueError("no routes: pass --route topic-pattern=url or set SAGALINE_OUTBOX_ROUTES")
        )
    server: Any = None
    if metrics_port:  # first: a missing extra fails before the database is touched
        try:
            server = ops.serve_outbox_metrics(metrics_port)
        except SagaError as exc:
            raise _fail(exc) from None
        typer.echo(f"relay: metrics on http://0.0.0.0:{metrics_port}/metrics", err=True)
    try:
        r = ops.outbox_relay(
            store or default_store_url(),
            routes,
            app=celery_app,
            batch=batch,
            max_attempts=max_attempts,
            backoff=backoff,
            max_backoff=max_backoff,
        )
    except (SagaError, ValueError) as exc:
        if server is not None:
            server.shutdown()
        raise _fail(exc) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"relay: {len(r.routes)} route(s); stop with SIGTERM or Ctrl-C", err=True)
    try:
        r.run(stop)
    finally:
        r.close()
        if server is not None:
            server.shutdown()


@outbox_cli.command("ls")
def ls(
    store: str | None = _Store,
    dead: bool = typer.Option(False, "--dead", help="Dead letters instead of pending."),
    limit: int = typer.Option(50, min=1),
) -> None:
    """List pending events (or dead letters), oldest first."""
    try:
        rows = ops.outbox_events(store or default_store_url(), dead=dead, limit=limit)
    except SagaError as exc:
        raise _fail(exc) from None
    for r in rows:
        error = f"  {r.last_error.splitlines()[0][:100]}" if r.last_error else ""
        typer.echo(f"{r.event_id}  {r.topic}  key={r.key or '-'}  attempts={r.attempts}{error}")
    typer.echo(f"{len(rows)} {'dead letter(s)' if dead else 'pending event(s)'}")


@outbox_cli.command("retry")
def retry(
    event_ids: list[str] = typer.Argument(None, help="Dead letters to send again."),  # noqa: B008
    store: str | None = _Store,
    all_dead: bool = typer.Option(False, "--all", help="Every dead letter."),
) -> None:
    """Make dead letters pending again (fresh attempts); the relay sends them."""
    if not event_ids and not all_dead:
        raise _fail(ValueError("name event ids, or pass --all"))
    try:
        n = ops.retry_outbox_events(
            store or default_store_url(), None if all_dead else list(event_ids)
        )
    except SagaError as exc:
        raise _fail(exc) from None
    typer.echo(f"{n} dead letter(s) pending again")


def register(cli: typer.Typer, app_runtime: Callable[[str, str | None], Any]) -> None:
    global _app_runtime
    _app_runtime = app_runtime
    cli.command("relay")(relay)
    cli.add_typer(outbox_cli, name="outbox")
