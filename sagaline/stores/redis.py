"""The Redis store: a hash per saga and per step, sorted-set indexes, Lua for every transition.

The key layout and the encoding of records are in redis_layout.py, the Lua
scripts in redis_scripts.py, the payloads of the write scripts in redis_payloads.py.

A step transition rewrites only that step's hash (and the saga hash when the saga
changed), never the whole saga. Every write is one Lua script, so it is atomic:
`claim_step` and `renew_lease` are a compare-and-set on the step's status and
attempt; `transact` reads the saga and its steps in one script, lets the engine
decide in Python, and writes with a script that writes nothing (the caller then
re-reads and decides again) unless the saga's `txn` counter and the version of
every record the decision changes are still those it read. The counter plays the
part of the SQL store's saga row lock: without it, two branches finishing at once
could each write their own step, each deciding on a snapshot without the other's
success, and nobody would start the step that waits for both. Claims and lease
renewals leave it alone, as they do not take the row lock in SQL either.
A Redis script is not rolled back when a command in it fails, so every script
does all of its checks before its first write.
Scripts touch keys they compute or receive in a JSON payload rather than only
through KEYS: the store runs on one Redis instance (or a primary with replicas),
not on Redis Cluster. It needs Redis 6.2 or newer (ZRANGE ... BYSCORE REV LIMIT).

Durability is Redis's: without the append-only file, a crash of Redis loses
whatever was written since the last RDB snapshot, and sagaline cannot notice.
In production run Redis with `appendonly yes` and `appendfsync everysec` (at most
about a second lost on a crash of the machine) or `appendfsync always` (nothing
acknowledged is lost), or use the SQL store on PostgreSQL.
"""

from __future__ import annotations

import heapq
import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

from ..exceptions import StoreError
from ..records import (
    PHASE_COLUMNS,
    Decision,
    Event,
    Owner,
    SagaFilter,
    SagaRecord,
    SagaState,
    StepRecord,
)
from ..states import Phase, SagaStatus
from . import redis_scripts as scripts
from .base import DEFAULT_RETRY_FOR, DueItem, Snapshot, Store, matches_filter, require_extra
from .finished import FinishWatch, RedisFinishedListener
from .redis_layout import chunks as _chunks
from .redis_layout import due_member as _due_member
from .redis_layout import event_json as _event_json
from .redis_layout import event_record as _event_record
from .redis_layout import saga_record as _saga_record
from .redis_layout import score as _score
from .redis_layout import step_record as _step_record
from .redis_payloads import create_payload, decision_payload
from .rows import from_row

redis = require_extra("redis", "redis")
# redis-py resolves host names with socket.getaddrinfo, which imports the idna codec
# on first use. Imported now, before a prefork pool forks: a child forked while a
# thread of its parent held that import's module lock would wait on it forever.
importlib.import_module("encodings.idna")


class RedisStore(Store):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagaline",
        retry_for: float = DEFAULT_RETRY_FOR,
        echo: bool = False,
        auto_migrate: bool = True,
        **client_options: Any,
    ):
        # `echo` and `auto_migrate` are SQL options the runtime passes to every store.
        del echo, auto_migrate
        self.url = url
        self.prefix = prefix
        self.retry_for = retry_for
        client_options.setdefault("socket_connect_timeout", 5)
        client_options.setdefault("socket_timeout", 10)
        client_options.setdefault("health_check_interval", 30)
        self._client: Any = redis.Redis.from_url(url, decode_responses=True, **client_options)
        # redis-py's Script runs EVALSHA and reloads the script after NOSCRIPT
        # (a restarted server has an empty script cache).
        self._create = self._client.register_script(scripts.CREATE)
        self._write = self._client.register_script(scripts.WRITE)
        self._cas_step = self._client.register_script(scripts.CAS_STEP)
        self._read_state = self._client.register_script(scripts.READ_STATE)
        # A restarting or loading server (BusyLoading is a ConnectionError), a dropped
        # connection.
        self._retry_errors = (redis.ConnectionError, redis.TimeoutError)
        self._listener: RedisFinishedListener | None = None

    # -- plumbing ----------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._client.close()

    def dispose_after_fork(self) -> None:
        """Forget connections inherited from a parent process without closing them."""
        self._listener = None
        self._client.connection_pool.reset()

    def watch_finished(self, saga_id: str) -> FinishWatch | None:
        listener = self._listener
        if listener is None or listener.pid != os.getpid():
            listener = self._listener = RedisFinishedListener(self._client, self._key("finished"))
        return listener.watch(saga_id)

    # -- writes ------------------------------------------------------------------

    def _insert_saga(self, state: SagaState, events: list[Event]) -> tuple[SagaRecord, bool]:
        saga = state.saga
        sid = saga.saga_id
        body = json.dumps(create_payload(self._key, state, events))

        def attempt() -> tuple[SagaRecord, bool]:
            owner = str(self._create(args=[body]))
            if owner == sid:
                return saga, True
            existing = self._read_saga(owner)
            if existing is None:  # an idempotency key whose saga was deleted by hand
                raise StoreError(
                    f"idempotency key {saga.idempotency_key!r} of {saga.name!r} "
                    f"names saga {owner!r}, which does not exist"
                )
            return existing, False

        return self._retrying(attempt)

    def claim_step(
        self,
        saga_id: str,
        step: str,
        phase: Phase,
        attempt: int,
        *,
        lease_until: float,
        now: float,
        owner: Owner | None = None,
    ) -> bool:
        cols = PHASE_COLUMNS[phase]
        # A compensation keeps the step's start time.
        extra = ["started_at", json.dumps(now)] if phase is Phase.FORWARD else []
        event = _event_json(Event(saga_id, cols.started, now, step, attempt, phase.value))
        extra += [
            "owner_node",
            json.dumps(None if owner is None else owner.node),
            "owner_boot",
            json.dumps(None if owner is None else owner.boot),
            "owner_pid",
            json.dumps(None if owner is None else owner.pid),
        ]
        claims = None if owner is None else self._key("claims", owner.node)
        return self._cas(
            saga_id, step, phase, attempt, cols.dispatched, lease_until, event, extra, claims
        )

    def renew_lease(
        self, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
    ) -> bool:
        return self._cas(
            saga_id, step, phase, attempt, PHASE_COLUMNS[phase].running, lease_until, "", []
        )

    def _cas(
        self,
        saga_id: str,
        step: str,
        phase: Phase,
        attempt: int,
        expected: Enum,
        lease_until: float,
        event: str,
        extra: list[str],
        claims: str | None = None,
    ) -> bool:
        """Move the step from `expected`(attempt) to RUNNING on the phase's fields."""
        cols = PHASE_COLUMNS[phase]
        keys = [self._key("step", saga_id, step), self._key("due"), self._key("events", saga_id)]
        if claims is not None:
            keys.append(claims)
        args = [
            cols.status,
            json.dumps(expected.value),
            cols.attempt,
            json.dumps(attempt),
            json.dumps(cols.running.value),
            json.dumps(lease_until),
            _score(lease_until),
            _due_member(saga_id, step),
            event,
            *extra,
        ]
        # A lost reply to a claim that did commit reads as a refused claim: the step
        # then stays RUNNING until its lease expires and the sweeper retries it.
        return self._retrying(lambda: int(self._cas_step(keys=keys, args=args)) == 1)

    @contextmanager
    def _locked(self, saga_id: str) -> Iterator[Snapshot | None]:
        # No lock is held while deciding: the write below checks the saga's `txn`
        # counter instead, and loses (the caller decides again) if another transact
        # wrote the saga since this read.
        loaded = self._load_state(saga_id)
        if loaded is None:
            yield None
            return
        state, txn = loaded

        def write(decision: Decision) -> bool:
            body = json.dumps(decision_payload(self._key, state, txn, decision))
            return int(self._write(args=[body])) == 1

        yield Snapshot(state, write)

    # -- reads -------------------------------------------------------------------

    def _load_state(self, saga_id: str) -> tuple[SagaState, str] | None:
        """The saga with its steps, and its `txn` counter."""
        reply = self._read_state(
            keys=[self._key("saga", saga_id), self._key("steps", saga_id)],
            args=[self._key("step", saga_id, "")],
        )
        if not reply:
            return None
        saga, *step_rows = json.loads(reply)
        # `txn` is no record field: from_row ignores it, as any unknown field.
        steps = [from_row(StepRecord, r) for r in step_rows]
        return (
            SagaState(from_row(SagaRecord, saga), {s.name: s for s in steps}),
            str(saga.get("txn", 0)),
        )

    def _read_saga(self, saga_id: str) -> SagaRecord | None:
        h = self._client.hgetall(self._key("saga", saga_id))
        return _saga_record(h) if h else None

    def _get_saga(self, saga_id: str) -> SagaRecord | None:
        return self._retrying(lambda: self._read_saga(saga_id))

    def _get_steps(self, saga_id: str) -> list[StepRecord]:
        loaded = self._retrying(lambda: self._load_state(saga_id))
        return [] if loaded is None else list(loaded[0].steps.values())

    def _history(self, saga_id: str, after_seq: int) -> list[Event]:
        start = max(after_seq, 0)
        rows = self._retrying(lambda: self._client.lrange(self._key("events", saga_id), start, -1))
        return [_event_record(saga_id, start + i + 1, raw) for i, raw in enumerate(rows)]

    def _history_tail(self, saga_id: str, limit: int, before_seq: int | None) -> list[Event]:
        # An event's seq is its 1-based index in the list, which only grows. The newest
        # events: LLEN and LRANGE in one MULTI (an append between them would shift seqs).
        key = self._key("events", saga_id)

        def read() -> tuple[int, list[Any]]:
            if before_seq is None:
                total, rows = self._client.pipeline().llen(key).lrange(key, -limit, -1).execute()
                return int(total) - len(rows) + 1, list(rows)
            stop = min(before_seq - 2, int(self._client.llen(key)) - 1)  # index of a seq
            start = max(stop - limit + 1, 0)
            return start + 1, list(self._client.lrange(key, start, stop)) if stop >= 0 else []

        first, rows = self._retrying(read)
        return [_event_record(saga_id, first + i, raw) for i, raw in enumerate(rows)]

    def _list_sagas(self, flt: SagaFilter) -> list[SagaRecord]:
        if flt.limit <= 0:
            return []
        lo = "-inf" if flt.created_after is None else _score(flt.created_after)
        hi = "+inf" if flt.created_before is None else "(" + _score(flt.created_before)
        if flt.before is not None and (
            flt.created_before is None or flt.before[0] < flt.created_before
        ):
            hi = _score(flt.before[0])  # inclusive: ties are cut by saga id in matches_filter
        sources = self._list_sources(flt)
        page = max(50, min(flt.offset + flt.limit, 500))

        def read() -> list[SagaRecord]:
            # Each index yields newest first (ties by id, descending, like the SQL
            # store); merging them keeps that order. Records are re-checked against
            # the filter because a saga may change status between the two reads.
            merged = heapq.merge(
                *(self._index_desc(k, hi, lo, page) for k in sources), reverse=True
            )
            out: list[SagaRecord] = []
            seen: set[str] = set()
            skip = flt.offset
            for batch in _chunks((sid for _, sid in merged), page):
                fresh = [s for s in dict.fromkeys(batch) if s not in seen]
                for saga in self._get_sagas(fresh):
                    seen.add(saga.saga_id)
                    if not matches_filter(saga, flt):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    out.append(saga)
                    if len(out) == flt.limit:
                        return out
            return out

        return self._retrying(read)

    def _list_sources(self, flt: SagaFilter) -> list[str]:
        """The smallest set of indexes whose union holds every match."""
        if flt.parent_saga_id is not None:  # children of one saga: few, filter the rest
            return [self._key("idx", "parent", flt.parent_saga_id)]
        if flt.status is not None:
            statuses = sorted({s.value for s in flt.status})
            if flt.name is not None:
                return [self._key("idx", "ns", s, flt.name) for s in statuses]
            return [self._key("idx", "status", s) for s in statuses]
        if flt.name is not None:
            return [self._key("idx", "name", flt.name)]
        return [self._key("idx", "created")]

    def _index_desc(self, key: str, hi: str, lo: str, page: int) -> Iterator[tuple[float, str]]:
        start = 0
        while True:
            rows = self._client.zrange(
                key, hi, lo, desc=True, byscore=True, withscores=True, offset=start, num=page
            )
            yield from ((float(score), str(member)) for member, score in rows)
            if len(rows) < page:
                return
            start += page

    def _get_sagas(self, ids: list[str]) -> list[SagaRecord]:
        pipe = self._client.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(self._key("saga", sid))
        return [_saga_record(h) for h in pipe.execute() if h]  # skip deleted sagas

    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]:
        def read() -> dict[SagaStatus, int]:
            pipe = self._client.pipeline(transaction=False)
            for s in SagaStatus:
                if name is None:
                    pipe.zcard(self._key("idx", "status", s.value))
                else:
                    pipe.zcard(self._key("idx", "ns", s.value, name))
            return {s: int(n) for s, n in zip(SagaStatus, pipe.execute(), strict=True)}

        return self._retrying(read)

    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        if limit <= 0:
            return []
        rows = self._retrying(
            lambda: self._client.zrange(
                self._key("due"),
                "-inf",
                _score(now),
                byscore=True,
                withscores=True,
                offset=0,
                num=limit,
            )
        )
        items = []
        for member, score in rows:
            saga_id, _, step = str(member).partition("\0")
            items.append(DueItem(saga_id, step or None, float(score)))
        return items

    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        if limit <= 0:
            return []

        def read() -> list[StepRecord]:
            members = self._client.zrange(self._key("claims", node), 0, limit - 1)
            pipe = self._client.pipeline(transaction=False)
            for member in members:
                saga_id, _, step = str(member).partition("\0")
                pipe.hgetall(self._key("step", saga_id, step))
            found = [_step_record(h) for h in pipe.execute() if h]
            # Re-checked: a claim may have ended between the two reads.
            return [r for r in found if r.owner_node == node and r.running_phase is not None]

        return self._retrying(read)
