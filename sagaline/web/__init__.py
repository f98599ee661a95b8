"""The REST API and the dashboard over `ops` (`pip install 'sagaline[web]'`).

`create_app(store=..., celery_app=...)` returns an ASGI app; mount it under any
path in your own FastAPI or Starlette app, or run it with `sagaline web`.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..ops import Store

__all__ = ["create_app"]


def create_app(
    store: Store | str | None = None,
    celery_app: Any = None,
    *,
    token: str | None = None,
    read_token: str | None = None,
) -> Any:
    """The dashboard at `/` and the REST API at `/api/v1`, as one ASGI app.

    `store`: a store or its URL (default: the store of `celery_app`, else of
    SAGALINE_STORE_URL). `celery_app`: your Celery app, set up with
    `sagaline.init_app`; without it the app only reads (no start, cancel, resume).
    `token` / `read_token` (default: SAGALINE_WEB_TOKEN / SAGALINE_WEB_READ_TOKEN):
    bearer tokens that may operate / only read; with neither, anyone who reaches
    the app may operate, so bind it to a loopback address only.
    """
    missing = [m for m in ("fastapi", "jinja2", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigurationError(f"{missing[0]!r} is not installed: pip install 'sagaline[web]'")
    from .factory import build_app

    return build_app(store, celery_app, token=token, read_token=read_token)
