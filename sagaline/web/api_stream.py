"""`GET /api/v1/sagas/stream`: the sagas of a list, as server-sent events when they change.

There is no change feed to follow in every store, so each connection reads its list
(one page: at most `limit` sagas, the list's filters) every LIST_POLL seconds and sends
the sagas that appeared or changed since its previous read. The work per connection is
bounded: one query of at most MAX_STREAM_PAGE rows per poll, for at most LIST_LIFETIME
seconds; then the stream ends and the browser's EventSource connects again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..records import SagaFilter, SagaRecord
from .api_read import STREAM_KEEPALIVE, saga_filter
from .app import context, reader
from .security import Principal

LIST_POLL = 0.5
LIST_LIFETIME = 600.0
MAX_STREAM_PAGE = 100


def _brief(saga: SagaRecord) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "name": saga.name,
        "status": saga.status.value,
        "created_at": saga.created_at,
        "updated_at": saga.updated_at,
        "failed_step": saga.failed_step,
    }


async def stream_sagas(
    request: Request,
    _who: Annotated[Principal, Depends(reader)],
    flt: Annotated[SagaFilter, Depends(saga_filter)],
) -> Any:
    """The list's page (its filters, newest first, `limit` sagas, at most 100 followed)
    as it changes: a `sagas` event at once with the page, then one whenever sagas enter
    it or change (status, or any update), listing those sagas."""
    store = context(request).store
    flt.limit = min(flt.limit, MAX_STREAM_PAGE)

    async def events() -> AsyncIterator[str]:
        seen: dict[str, tuple[str, float]] | None = None  # None: nothing sent yet
        started = quiet_since = time.monotonic()
        yield "retry: 2000\n\n"
        while time.monotonic() - started < LIST_LIFETIME:
            if await request.is_disconnected():
                return
            page = await run_in_threadpool(store.list_sagas, flt)
            now = {s.saga_id: (s.status.value, s.updated_at) for s in page}
            changed = [s for s in page if seen is None or seen.get(s.saga_id) != now[s.saga_id]]
            if changed or seen is None:
                quiet_since = time.monotonic()
                data = json.dumps({"sagas": [_brief(s) for s in changed]})
                yield f"event: sagas\ndata: {data}\n\n"
            elif time.monotonic() - quiet_since > STREAM_KEEPALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            seen = now
            await asyncio.sleep(LIST_POLL)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
