"""The CLI's plumbing: errors as one line and an exit status, JSON and console output,
the store or the Celery app a command works on, and the parsing of times and statuses."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any, NoReturn

import typer
from rich.console import Console

from . import ops
from .config import default_store_url
from .exceptions import (
    ConfigurationError,
    InvalidTransition,
    SagaError,
    SagaNotFound,
    StoreError,
)
from .ops import Runtime, Store, cut_deep, first_line, redact
from .states import SagaStatus

EXIT_ERROR, EXIT_NOT_FOUND, EXIT_STORE, EXIT_NOT_ALLOWED = 1, 2, 3, 4
HOME_STORE = "SQLite in $SAGALINE_HOME"
# How long a CLI command retries an unreachable store before it says so.
STORE_WAIT = 2.0


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output gets a wide table rather than saga ids folded over two lines.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(file=stream, width=width)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {first_line(message)}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Every sagaline error becomes one line on stderr and an exit status."""
    try:
        yield
    except SagaNotFound as exc:
        _fail(str(exc), EXIT_NOT_FOUND)
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
    except InvalidTransition as exc:
        _fail(str(exc), EXIT_NOT_ALLOWED)
    except SagaError as exc:
        _fail(str(exc), EXIT_ERROR)
    except RecursionError:
        _fail("a stored value is nested too deeply for Python to read", EXIT_ERROR)


def _json(doc: Any, indent: int | None = None) -> str:
    """`doc` as JSON, whatever the store holds: a value nested deeper than Python's
    recursion limit allows is shown cut, with a marker, rather than as a traceback."""
    try:
        return json.dumps(doc, indent=indent, default=str)
    except RecursionError:
        return json.dumps(cut_deep(doc, DEEPEST_JSON), indent=indent, default=str)


# Levels of nesting `--json` prints when a value is too deep to print whole.
DEEPEST_JSON = 200


def store_option(default: str = HOME_STORE, help: str = "State store URL.") -> Any:
    """The `--store` option of a command, its default (a description: the URL is worked
    out when the command runs) shown by click as `[default: ...]`. Typed into the help,
    the brackets would be Rich markup, and the default would not be printed."""
    return typer.Option(
        None,
        "--store",
        envvar="SAGALINE_STORE_URL",
        show_envvar=True,
        show_default=default,
        help=help,
    )


@contextlib.contextmanager
def reading(store: str | None) -> Iterator[Store]:
    """The store to read for one command: it must exist, and an unreachable server is
    given up on within seconds. No Celery app: reading needs no definitions, no broker."""
    target = ops.open_store(store or default_store_url(), read_only=True, give_up_after=STORE_WAIT)
    try:
        yield target
    finally:
        target.close()


def app_runtime(module: str, store: str | None = None) -> Runtime:
    """The runtime of the user's Celery app: its definitions, its broker, its store."""
    app = _import_app(module)
    runtime = getattr(app, "_sagaline_runtime", None)
    if not isinstance(runtime, Runtime):
        raise ConfigurationError(
            f"the Celery app in {module!r} did not call sagaline.init_app(app)"
        )
    if store and store != runtime.settings.store_url:
        raise ConfigurationError(
            f"--store {redact(store)} differs from the store of "
            f"{module!r} ({redact(runtime.settings.store_url)})"
        )
    return runtime


def _import_app(module: str) -> Any:
    from celery.app.utils import find_app

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return find_app(module)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load a Celery app from {module!r}: {exc}") from None


def parse_time(value: str, now: float | None = None) -> float:
    """An ISO time (local when naive) or a relative one back from now: 30s, 10m, 2h, 1d, 1w."""
    try:
        return ops.parse_when(value, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_statuses(values: list[str] | None) -> list[SagaStatus] | None:
    if not values:
        return None
    statuses = []
    for raw in values:
        for part in raw.split(","):
            try:
                statuses.append(SagaStatus(part.strip().upper()))
            except ValueError:
                names = ", ".join(s.value.lower() for s in SagaStatus)
                raise typer.BadParameter(f"unknown status {part!r} (one of {names})") from None
    return statuses


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")
