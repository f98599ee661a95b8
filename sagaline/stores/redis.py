"""The Redis store: a hash per saga and per step, sorted-set indexes, Lua for every transition.

The key layout and the encoding of records are in redis_layout.py, the Lua
scripts in redis_scripts.py, the payloads of the write scripts in redis_payloads.py,
the reads across sagas in redis_reads.py, creation with an idempotency key in
redis_create.py, claims in redis_claims.py, the step records a process holds
between reads in redis_cache.py, retention (`gc`) in redis_gc.py, the migration
from the first layout in redis_migrate.py, and its URLs and clients (one server
or a cluster) in redis_client.py.

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
renewals leave it alone, as they do not take the row lock in SQL either. The read
returns whole only the steps this process does not hold at their current version,
and a step's completion decides on the read its claim's script made: a step costs
two scripts, the claim and the completion's write.
A Redis script is not rolled back when a command in it fails, so every script
does all of its checks before its first write.

Redis Cluster: `redis+cluster://host:port/` (or `rediss+cluster://`) opens the
store with redis-py's RedisCluster; any node of the cluster will do as the first
one. Sagas are spread over a fixed number of buckets, each one hash slot, and a
saga's keys and its index entries share its bucket, so every script touches one
slot and gets one of its keys as KEYS[1], which routes it (redis_layout.py). The
same layout serves a single Redis (`redis://`). It needs Redis 6.2 or newer
(ZRANGE ... BYSCORE REV LIMIT).

Durability is Redis's: without the append-only file, a crash of Redis loses
whatever was written since the last RDB snapshot, and sagaline cannot notice.
In production run Redis with `appendonly yes` and `appendfsync everysec` (at most
about a second lost on a crash of the machine) or `appendfsync always` (nothing
acknowledged is lost), or use the SQL store on PostgreSQL.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from ..exceptions import ConfigurationError
from ..forking import child_safe_lock
from ..records import (
    Decision,
    Event,
    Owner,
    SagaFilter,
    SagaRecord,
    SagaState,
    StepRecord,
)
from ..states import Phase, SagaStatus
from . import redis_claims, redis_gc
from . import redis_reads as reads
from . import redis_scripts as scripts
from .base import DEFAULT_RETRY_FOR, DueItem, Snapshot, Store
from .finished import FinishWatch, RedisFinishedListener
from .kept_claims import KeptClaims
from .redis_cache import StaleCache, StepCache, held_arg
from .redis_client import client_url, new_client
from .redis_create import insert_saga
from .redis_layout import DEFAULT_BUCKETS, Layout, decode_ended
from .redis_layout import event_record as _event_record
from .redis_layout import saga_record as _saga_record
from .redis_migrate import read_layout
from .redis_payloads import decision_payload
from .registry import require_extra

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
        buckets: int | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        echo: bool = False,
        auto_migrate: bool = True,
        **client_options: Any,
    ):
        # `echo` is an SQL option the runtime passes to every store. Without
        # `auto_migrate` (tools that only read) an empty store is read, not set up.
        del echo
        self._set_up = auto_migrate
        self.url = url
        self.prefix = prefix
        self.retry_for = retry_for
        self._url, self.cluster, url_buckets = client_url(url)
        if buckets is not None and url_buckets is not None and buckets != url_buckets:
            raise ConfigurationError(
                f"buckets={buckets} and the URL's buckets={url_buckets} differ: give one"
            )
        buckets = buckets if buckets is not None else url_buckets
        Layout(prefix, DEFAULT_BUCKETS if buckets is None else buckets)  # refused now if bad
        self._buckets_asked = buckets
        self._layout: Layout | None = None
        client_options.setdefault("socket_connect_timeout", 5)
        client_options.setdefault("socket_timeout", 10)
        client_options.setdefault("health_check_interval", 30)
        self._options = client_options
        self._lock = child_safe_lock()
        self._conn: Any = None
        self._scripts: Any = None
        # A restarting or loading server (BusyLoading is a ConnectionError), a dropped
        # connection; on a cluster also a failover under way.
        self._retry_errors = (redis.ConnectionError, redis.TimeoutError)
        if self.cluster:
            exc = redis.exceptions
            # RedisClusterException: no node of the cluster answered when the slot map
            # was asked for (the client is made again on the next try).
            self._retry_errors += (
                exc.ClusterDownError,
                exc.TryAgainError,
                exc.ClusterError,
                exc.RedisClusterException,
            )
        else:
            self._connect()  # no I/O: redis-py connects on the first command
        self._listener: RedisFinishedListener | None = None
        self._steps_held = StepCache()
        # The read of each claim, with the step versions it sent (kept_claims.py).
        self._claimed: KeptClaims[tuple[str, dict[str, str]]] = KeptClaims()

    # Retention (Store.gc): its steps for this layout are in redis_gc.py.
    _gc_candidates = redis_gc.candidates
    _gc_children = redis_gc.children
    _gc_count = redis_gc.count
    _gc_delete = redis_gc.delete

    # -- plumbing ----------------------------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        # Of RedisCluster's own errors, only "no node answered" is worth waiting out
        # ("keys in different slots" and the like are not).
        if type(exc) is redis.exceptions.RedisClusterException:
            return "cannot be connected" in str(exc)
        return True

    def _connect(self) -> Any:
        client = new_client(self._url, self.cluster, self._options)
        # redis-py's Script runs EVALSHA and reloads the script after NOSCRIPT
        # (a restarted server has an empty script cache).
        self._scripts = SimpleNamespace(
            create=client.register_script(scripts.CREATE),
            write=client.register_script(scripts.WRITE),
            cas_step=client.register_script(scripts.CAS_STEP),
            read_state=client.register_script(scripts.READ_STATE),
            idem=client.register_script(scripts.IDEM),
            abort=client.register_script(scripts.ABORT),
            gc=client.register_script(scripts.GC),
            release_idem=client.register_script(scripts.RELEASE_IDEM),
        )
        self._conn = client
        return client

    @property
    def _client(self) -> Any:
        client = self._conn
        if client is None:
            with self._lock:
                client = self._conn if self._conn is not None else self._connect()
        return client

    @property
    def scripts(self) -> Any:
        """The store's Lua scripts, registered with the current client."""
        self._client  # noqa: B018 - connects (a cluster client after a fork) if needed
        return self._scripts

    @property
    def layout(self) -> Layout:
        """The store's key layout, read from Redis (and written there by its first user)."""
        layout = self._layout
        if layout is None:
            layout, kept = self._retrying(
                lambda: read_layout(self._client, self.prefix, self._buckets_asked, self._set_up)
            )
            if kept:  # else read again next time: the store may be set up meanwhile
                self._layout = layout
        return layout

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._conn is not None:
            self._conn.close()

    def dispose_after_fork(self) -> None:
        """Forget connections inherited from a parent process without closing them."""
        self._listener = None
        self._claimed.clear()
        if self.cluster:
            self._conn = None  # a new client (and its connections) on first use
        else:
            self._client.connection_pool.reset()

    def watch_finished(self, saga_id: str) -> FinishWatch | None:
        listener = self._listener
        if listener is None or listener.pid != os.getpid():
            layout = self.layout
            listener = self._listener = RedisFinishedListener(
                self._client, layout.finished_channel(), layout.ended_channel(), decode_ended
            )
        return listener.watch(saga_id)

    def migrate(self) -> None:
        """Rewrite a store of the first key layout into this one (redis_migrate.py)."""
        from .redis_migrate import migrate_layout

        self._layout = self._retrying(
            lambda: migrate_layout(self._client, self.prefix, self._buckets_asked)
        )

    # -- writes ------------------------------------------------------------------

    def _insert_saga(self, state: SagaState, events: list[Event]) -> tuple[SagaRecord, bool]:
        return insert_saga(self, state, events)

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
        return redis_claims.claim(self, saga_id, step, phase, attempt, lease_until, now, owner)

    def renew_lease(
        self, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
    ) -> bool:
        return redis_claims.renew(self, saga_id, step, phase, attempt, lease_until)

    @contextmanager
    def _locked(self, saga_id: str) -> Iterator[Snapshot | None]:
        # No lock is held while deciding: the write below checks the saga's `txn`
        # counter instead, and loses (the caller decides again) if another transact
        # wrote the saga since this read.
        claimed = self._claimed.take(saga_id)  # read by this process's claim of a step
        if claimed is not None:
            loaded = self._decoded(saga_id, *claimed)
        else:
            loaded = self._load_state(saga_id, cached=True)
        if loaded is None:
            self._steps_held.forget(saga_id)
            yield None
            return
        state, txn = loaded
        layout = self.layout

        def write(decision: Decision) -> bool:
            body = json.dumps(decision_payload(layout, state, txn, decision))
            keys = [layout.saga_key(saga_id)]
            if int(self.scripts.write(keys=keys, args=[body])) != 1:
                return False
            self._steps_held.written(saga_id, state.saga.created_at, decision)
            return True

        yield Snapshot(state, write)

    # -- reads -------------------------------------------------------------------

    def _load_state(self, saga_id: str, *, cached: bool = False) -> tuple[SagaState, str] | None:
        """The saga with its steps, and its `txn` counter. `cached`: with the step records
        this process holds at their current versions (redis_cache.py), for a decision."""
        layout = self.layout
        sent = self._steps_held.known_versions(saga_id) if cached else None
        reply = self.scripts.read_state(
            keys=[layout.saga_key(saga_id), layout.steps_key(saga_id)],
            args=[layout.step_key_prefix(saga_id), held_arg(sent)],
        )
        return self._decoded(saga_id, reply, sent)

    def _decoded(
        self, saga_id: str, reply: str, sent: dict[str, str] | None
    ) -> tuple[SagaState, str] | None:
        try:
            return self._steps_held.state(saga_id, reply, sent)
        except StaleCache:  # another thread replaced what was held when `sent` was sent
            return self._load_state(saga_id)

    def _read_saga(self, saga_id: str) -> SagaRecord | None:
        h = self._client.hgetall(self.layout.saga_key(saga_id))
        return _saga_record(h) if h else None

    def _get_saga(self, saga_id: str) -> SagaRecord | None:
        return self._retrying(lambda: self._read_saga(saga_id))

    def _get_steps(self, saga_id: str) -> list[StepRecord]:
        loaded = self._retrying(lambda: self._load_state(saga_id))
        return [] if loaded is None else list(loaded[0].steps.values())

    def _history(self, saga_id: str, after_seq: int, limit: int | None) -> list[Event]:
        start = max(after_seq, 0)
        stop = -1 if limit is None else start + limit - 1
        key = self.layout.events_key(saga_id)
        rows = self._retrying(lambda: self._client.lrange(key, start, stop))
        return [_event_record(saga_id, start + i + 1, raw) for i, raw in enumerate(rows)]

    def _history_tail(self, saga_id: str, limit: int, before_seq: int | None) -> list[Event]:
        # An event's seq is its 1-based index in the list, which only grows. The newest
        # events: LLEN and LRANGE in one MULTI (an append between them would shift seqs).
        key = self.layout.events_key(saga_id)

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
        return self._retrying(lambda: reads.list_sagas(self._client, self.layout, flt))

    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]:
        return self._retrying(lambda: reads.count_by_status(self._client, self.layout, name))

    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        if limit <= 0:
            return []
        return self._retrying(lambda: reads.find_due(self._client, self.layout, now, limit))

    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        if limit <= 0:
            return []
        return self._retrying(lambda: reads.find_claimed(self._client, self.layout, node, limit))
