"""REST API `/api/v1`: the routes that read (sagas, counts, a saga, its history and its
event stream), and the page tokens and times their queries take; `api.py` mounts them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from .. import ops
from ..exceptions import SagaNotFound
from ..records import SagaFilter
from ..states import SAGA_TERMINAL, SagaStatus
from .app import Problem, context, reader
from .security import Principal

MAX_PAGE = 500
MAX_EVENTS = 1000
# How often an event stream looks for new events, and sends a comment to keep it open.
STREAM_POLL = 0.25
STREAM_KEEPALIVE = 15.0

SagaId = Annotated[str, Path(description="The saga's id", max_length=200)]


def _timestamp(value: str | None, name: str) -> float | None:
    """An RFC 3339 time (a leap second reads as :59) as Unix time; 422 otherwise."""
    if value is None:
        return None
    text = value.strip().upper().replace("Z", "+00:00").replace(":60", ":59")
    try:
        return datetime.fromisoformat(text).timestamp()
    except (OverflowError, OSError, ValueError):
        raise Problem(
            422, "invalid request", f"{name}: {value!r} is not an RFC 3339 date-time"
        ) from None


TimeParam = Annotated[str | None, Query(max_length=64, json_schema_extra={"format": "date-time"})]
SeqParam = Annotated[int, Query(ge=0, le=2**62)]


# A page token is the (created_at, saga_id) of the last saga of the previous page; any
# string of this form is a valid position, so the schema says exactly what is accepted.
PAGE_TOKEN = r"^[0-9]{1,12}(\.[0-9]{1,17})?~[A-Za-z0-9_.:-]{1,200}$"


def encode_token(created_at: float, saga_id: str) -> str:
    # repr: every digit, so that the cursor sits exactly on the last saga (a rounded
    # time would repeat it, or skip sagas created within the rounding).
    return f"{created_at!r}~{saga_id}"


def decode_token(token: str) -> tuple[float, str]:
    if not re.match(PAGE_TOKEN, token):
        raise Problem(400, "invalid page_token", "pass the next_page_token of a previous page")
    created_at, _, saga_id = token.partition("~")
    return float(created_at), saga_id


def saga_filter(
    status: Annotated[list[SagaStatus] | None, Query(description="Repeatable")] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    since: TimeParam = None,
    until: TimeParam = None,
    idempotency_key: Annotated[str | None, Query(max_length=500)] = None,
    failed_step: Annotated[str | None, Query(max_length=200)] = None,
    parent: Annotated[str | None, Query(max_length=200, description="Parent saga id")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    page_token: Annotated[str | None, Query(pattern=PAGE_TOKEN)] = None,
) -> SagaFilter:
    """The list's filters (every one given must match), as the store takes them."""
    return SagaFilter(
        status=status,
        name=name,
        created_after=_timestamp(since, "since"),
        created_before=_timestamp(until, "until"),
        idempotency_key=idempotency_key,
        failed_step=failed_step,
        parent_saga_id=parent,
        limit=limit,
        before=None if page_token is None else decode_token(page_token),
    )


def list_sagas(
    request: Request,
    _who: Annotated[Principal, Depends(reader)],
    flt: Annotated[SagaFilter, Depends(saga_filter)],
) -> Any:
    """Sagas matching every filter given, newest first, a page at a time (keyset)."""
    views = ops.find_sagas(context(request).store, flt)
    last = views[-1].saga if len(views) == flt.limit else None
    return {
        "sagas": [ops.summary_as_dict(v) for v in views],
        "next_page_token": None if last is None else encode_token(last.created_at, last.saga_id),
    }


def count_sagas(
    request: Request,
    _who: Annotated[Principal, Depends(reader)],
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """How many sagas are in each status (computed at most every 10 s)."""
    return {"counts": context(request).counts(name)}


def get_saga(request: Request, saga_id: SagaId, _who: Annotated[Principal, Depends(reader)]) -> Any:
    """A saga with its steps, attempts, history and children (as `sagaline show --json`)."""
    return ops.view_as_dict(ops.read_saga(context(request).store, saga_id))


def get_events(
    request: Request,
    saga_id: SagaId,
    _who: Annotated[Principal, Depends(reader)],
    after_seq: SeqParam = 0,
    before_seq: Annotated[
        int | None,
        Query(
            ge=1,
            le=2**62,
            description="Read backwards: the newest `limit` events before this seq "
            "(still oldest first); page on with next_before_seq",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = MAX_EVENTS,
) -> Any:
    """The saga's history after `after_seq` (the oldest `limit` events), or before
    `before_seq` (the newest `limit` of those), oldest first."""
    store = context(request).store
    if store.get_saga(saga_id) is None:
        raise SagaNotFound(saga_id)
    earlier = None
    if before_seq is None:
        events = store.history(saga_id, after_seq=after_seq, limit=limit)
    else:
        events = store.history_tail(saga_id, limit=limit, before_seq=before_seq)
        if len(events) == limit and events[0].seq is not None:
            earlier = events[0].seq
        events = [e for e in events if (e.seq or 0) > after_seq]
    last = events[-1].seq if events and events[-1].seq is not None else after_seq
    return {
        "events": [ops.event_as_dict(e) for e in events],
        "next_after_seq": last,
        "next_before_seq": earlier if earlier is not None and earlier > after_seq + 1 else None,
    }


async def stream_events(
    request: Request,
    saga_id: SagaId,
    _who: Annotated[Principal, Depends(reader)],
    after_seq: SeqParam = 0,
    last_event_id: Annotated[str | None, Header(max_length=30)] = None,
) -> Any:
    """Every history event after `after_seq` (or Last-Event-ID), then each new one as it
    commits. One saga's events commit in order under its lock, so none is skipped."""
    store = context(request).store
    if last_event_id and last_event_id.isdigit():
        after_seq = max(after_seq, int(last_event_id))
    if await run_in_threadpool(store.get_saga, saga_id) is None:
        raise SagaNotFound(saga_id)

    async def events() -> AsyncIterator[str]:
        seq, quiet_since = after_seq, time.monotonic()
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            batch = await run_in_threadpool(store.history, saga_id, after_seq=seq)
            for event in batch:
                seq = event.seq or seq
                data = json.dumps(ops.event_as_dict(event), default=str)
                yield f"id: {seq}\nevent: saga_event\ndata: {data}\n\n"
            if batch:
                quiet_since = time.monotonic()
            saga = await run_in_threadpool(store.get_saga, saga_id)
            if saga is None or (saga.status in SAGA_TERMINAL and not batch):
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - quiet_since > STREAM_KEEPALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
