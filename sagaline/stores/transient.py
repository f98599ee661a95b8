"""Waiting out a store's transient failures, and naming a store in messages without its
password."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ..exceptions import StoreError

T = TypeVar("T")
log = logging.getLogger("sagaline.stores")


def retry_transient(
    fn: Callable[[], T],
    *,
    url: str,
    retry_for: float,
    errors: tuple[type[BaseException], ...],
    transient: Callable[[BaseException], bool] = lambda exc: True,
) -> T:
    """Run `fn`, retrying transient failures (a restarting server, a lock) with backoff
    for `retry_for` seconds; then, or at once for a permanent error, raise StoreError."""
    deadline = time.monotonic() + retry_for
    delay = 0.05
    while True:
        try:
            return fn()
        except errors as exc:
            cause = getattr(exc, "orig", None) or exc
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise StoreError(f"store {redact(url)} failed: {first}") from exc
            log.warning("store %s: %s; retrying in %.2fs", redact(url), first, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"
