"""What the store suites share: test server URLs, saga states to store, threads run together.

Used by the store contract suite (every store), the Redis store's own suite and
the suites that need a MariaDB database of their own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from sagaline.records import SagaRecord, SagaState, StepRecord
from sagaline.states import SagaStatus, StepStatus
from sagaline.stores import Store

T0 = 1_700_000_000.125
THREADS = 20

# -- servers -----------------------------------------------------------------------------

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_TEST_DB = 15
MARIADB_SERVER = "mysql+pymysql://root@127.0.0.1:3306"


def redis_test_url() -> str:
    """Database 15 of the test Redis ($SAGALINE_TEST_REDIS_URL, else the local server)."""
    parts = urlsplit(os.environ.get("SAGALINE_TEST_REDIS_URL", DEFAULT_REDIS_URL))
    return urlunsplit((parts.scheme, parts.netloc, f"/{REDIS_TEST_DB}", "", ""))


def raw_client(url: str) -> Any:
    """A plain redis-py client (RedisCluster for a cluster URL) of a Redis store's server."""
    import redis

    if url.startswith("redis+cluster://"):
        return redis.RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1), decode_responses=True
        )
    return redis.Redis.from_url(url, decode_responses=True)


def delete_prefix(client: Any, prefix: str) -> None:
    """Delete every key under `prefix` (a test's own key prefix on the shared Redis)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def create_mariadb_database() -> str:
    """A new, empty MariaDB database with the server's default charset and collation."""
    import pymysql

    name = f"sagaline_test_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        conn.close()
    return f"{MARIADB_SERVER}/{name}"


def drop_mariadb_database(url: str) -> None:
    import pymysql

    name = url.rsplit("/", 1)[1]
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


# -- records -----------------------------------------------------------------------------


def make_state(
    *,
    saga_id: str | None = None,
    name: str = "contract",
    key: str | None = None,
    created_at: float = T0,
    status: SagaStatus = SagaStatus.RUNNING,
    due_at: float | None = None,
    deadline: float | None = None,
    parent: str | None = None,
    input: dict[str, Any] | None = None,
    steps: Sequence[str] = ("a", "b", "c"),
    step_due: float | None = None,
) -> SagaState:
    """A saga of steps in a chain (a -> b -> c by default), the first one DISPATCHED
    (attempt 1) and due at `step_due` (else 30 s after creation), the others PENDING."""
    sid = saga_id or str(uuid.uuid4())
    saga = SagaRecord(
        saga_id=sid,
        name=name,
        status=status,
        input=input or {"n": 1},
        fingerprint="f" * 16,
        created_at=created_at,
        updated_at=created_at,
        idempotency_key=key,
        due_at=due_at,
        deadline=deadline,
        parent_saga_id=parent,
    )
    first, *rest = steps
    records = {
        first: StepRecord(
            sid,
            first,
            0,
            status=StepStatus.DISPATCHED,
            attempt=1,
            due_at=created_at + 30 if step_due is None else step_due,
        )
    }
    records.update({n: StepRecord(sid, n, i) for i, n in enumerate(rest, 1)})
    return SagaState(saga, records)


# -- reads -------------------------------------------------------------------------------

# The store's reads of one saga; read_state may call the other two, counted once.
SAGA_READS = ("get_saga", "get_steps", "read_state")


class Read(NamedTuple):
    method: str  # one of SAGA_READS
    status: SagaStatus | None  # the saga's status it read (None: no saga, or only steps)


@contextlib.contextmanager
def counted_reads(store: Store) -> Iterator[list[Read]]:
    """Count the saga reads made through `store` meanwhile, what `SagaHandle.get()` costs:
    yields the list of them, in order (a read that another counted read made on the
    way counts as part of it). One reading thread at a time."""
    reads: list[Read] = []
    depth = [0]

    def counted(method: str) -> Callable[[str], Any]:
        read = getattr(store, method)

        def wrapper(saga_id: str) -> Any:
            depth[0] += 1
            try:
                found = read(saga_id)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                saga = found.saga if isinstance(found, SagaState) else found
                status = saga.status if isinstance(saga, SagaRecord) else None
                reads.append(Read(method, status))
            return found

        return wrapper

    for method in SAGA_READS:
        setattr(store, method, counted(method))
    try:
        yield reads
    finally:
        for method in SAGA_READS:
            delattr(store, method)  # the class's method again


# -- concurrency -------------------------------------------------------------------------


def run_threads(n: int, target: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """Call target(0..n-1) from n threads released at the same instant; their results.

    Raises the first error a thread raised, and fails if a thread is still running
    after `timeout` seconds.
    """
    start = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]
    return results
