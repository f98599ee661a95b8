"""`sagaline web`: serve the dashboard and the REST API with uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import typer

from ..cli_support import HOME_STORE, store_option
from ..exceptions import ConfigurationError


def web_command(
    errors: Callable[[], AbstractContextManager[None]],
    app_runtime: Callable[[str, str | None], Any],
    reading: Callable[[str | None], AbstractContextManager[Any]],
) -> Callable[..., None]:
    """The command, given the CLI's error reporting and its ways to open an app or a store."""

    def web(
        app: str | None = typer.Option(
            None,
            "-A",
            "--app",
            help="Module of your Celery app: needed to start, "
            "cancel and resume; without it the server only "
            "reads.",
        ),
        host: str = typer.Option(
            "127.0.0.1", help="Address to bind (beyond loopback only with SAGALINE_WEB_TOKEN set)."
        ),
        port: int = typer.Option(8000, min=0, max=65535),
        store: str | None = store_option(f"the app's with -A, else {HOME_STORE}"),
        root_path: str = typer.Option("", help="The path prefix a proxy serves it under."),
    ) -> None:
        """Serve the dashboard (/) and the REST API (/api/v1) over HTTP."""
        with errors():
            from . import create_app
            from .security import Access, check_bind

            try:
                import uvicorn
            except ImportError:
                raise ConfigurationError(
                    "'uvicorn' is not installed: pip install 'sagaline[web]'"
                ) from None
            check_bind(host, Access.from_env())
            if app is not None:
                runtime = app_runtime(app, store)
                asgi = create_app(runtime.store, runtime.app)
            else:
                asgi = None
            if asgi is not None:
                _serve(uvicorn, asgi, host, port, root_path)
                return
            with reading(store) as target:
                _serve(uvicorn, create_app(target), host, port, root_path)

    return web


def _serve(uvicorn: Any, asgi: Any, host: str, port: int, root_path: str) -> None:
    typer.echo(
        f"sagaline web: http://{host}:{port}{root_path}/ (API: {root_path}/api/v1)", err=True
    )
    uvicorn.run(
        asgi, host=host, port=port, root_path=root_path, log_level="warning", proxy_headers=True
    )
