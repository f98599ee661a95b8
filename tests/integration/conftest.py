"""Fixtures for tests on real workers: a `Stack` is a worker process plus a client runtime."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery

import sagaline
from sagaline.runtime import Runtime
from tests.harness import WorkerProcess, rabbitmq_queue_types, rabbitmq_vhost
from tests.integration import sagas_app
from tests.stores import delete_prefix, raw_client, redis_test_url

APP = "tests.integration.sagas_app"


@dataclass
class Stack:
    name: str
    runtime: Runtime
    env: dict[str, str]
    ledger_dsn: str
    worker: WorkerProcess

    def run(self, saga: sagaline.Saga, **input: Any) -> sagaline.SagaHandle:
        return self.runtime.start_saga(saga, input)

    def ledger(self, saga_id: str) -> list[tuple[str, str, Any, float | None, float]]:
        with psycopg.connect(self.ledger_dsn) as conn:
            rows = conn.execute(
                "SELECT step, action, data, started, finished FROM ledger "
                "WHERE saga_id = %s ORDER BY id",
                (saga_id,),
            ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def make_stack(
    kind: str,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    extra_env: dict[str, str] | None = None,
    store_url: str | None = None,
) -> Iterator[Stack]:
    """`kind`: "redis+postgres", "redis+redis", "embedded", "rabbitmq+postgres",
    "rabbitmq-quorum+postgres", or "redis+<other>" with `store_url` (the Redis broker
    and that store: "redis+redis-cluster" with `cluster_store_url`)."""
    if kind.startswith("rabbitmq"):
        # Its own vhost on the shared RabbitMQ: no other worker sees these queues.
        with rabbitmq_vhost() as amqp_url:
            yield from _make_stack(
                kind, pg_url, redis_url, tmp_path_factory, extra_env, store_url, amqp_url
            )
    else:
        yield from _make_stack(kind, pg_url, redis_url, tmp_path_factory, extra_env, store_url)


def _make_stack(
    kind: str,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    extra_env: dict[str, str] | None = None,
    store_url: str | None = None,
    amqp_url: str = "",
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("home")
    ledger_dsn = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(ledger_dsn, autocommit=True) as conn:
        conn.execute(sagas_app.LEDGER_DDL)
    env = {"LEDGER_URL": pg_url, "SAGALINE_HOME": str(home), "SAGALINE_SWEEP_INTERVAL": "1"}
    client = Celery(f"client-{kind}")
    if store_url is not None:
        store = store_url
        env["CELERY_BROKER_URL"] = redis_url
        client.conf.broker_url = redis_url
    elif kind == "redis+postgres":
        store = pg_url
        env["CELERY_BROKER_URL"] = redis_url
        client.conf.broker_url = redis_url
    elif kind == "redis+redis":
        store = redis_url.rsplit("/", 1)[0] + "/14"
        import redis

        redis.Redis.from_url(store).flushdb()
        env["CELERY_BROKER_URL"] = redis_url
        client.conf.broker_url = redis_url
    elif kind.startswith("rabbitmq"):
        store = pg_url
        env["CELERY_BROKER_URL"] = client.conf.broker_url = amqp_url
        if kind == "rabbitmq-quorum+postgres":
            # Every process that declares the queue must ask for the same type.
            env["SAGALINE_TEST_QUEUE_TYPE"] = "quorum"
            client.conf.task_default_queue_type = "quorum"
    else:
        store = f"sqlite:///{home}/state.db"
        env["CELERY_BROKER_URL"] = ""
        os.environ["SAGALINE_HOME"] = str(home)
    env["SAGALINE_STORE_URL"] = store
    env.update(extra_env or {})
    # The client's settings matter too: whoever dispatches a step sets its due time.
    timing = {
        name: float(env[f"SAGALINE_{name.upper()}"])
        for name in ("lease", "redispatch_after")
        if f"SAGALINE_{name.upper()}" in env
    }
    runtime = sagaline.init_app(client, store=store, sweeper=False, **timing)
    worker = WorkerProcess(APP, env=env, concurrency=3, workdir=home / "worker")
    worker.start()
    try:
        if amqp_url:  # the stack is what it says: the workers' queue has the type asked for
            queue_type = rabbitmq_queue_types(amqp_url).get("celery")
            assert queue_type == env.get("SAGALINE_TEST_QUEUE_TYPE", "classic"), queue_type
        yield Stack(kind, runtime, env, ledger_dsn, worker)
    finally:
        worker.stop()
        runtime.store.close()
        os.environ.pop("SAGALINE_HOME", None)


# The stacks every worker test runs on; the engine's acceptance suite
# (test_sagas_on_workers.py) adds RabbitMQ with classic and with quorum queues, and
# the Redis store on a Redis Cluster (`cluster_store_url`).
STACKS = ["redis+postgres", "embedded", "redis+redis"]
CLUSTER_STACK = "redis+redis-cluster"
BROKER_STACKS = [*STACKS, "rabbitmq+postgres", "rabbitmq-quorum+postgres", CLUSTER_STACK]


def cluster_store_url(request: pytest.FixtureRequest) -> str:
    """The store URL of the session's private Redis Cluster, emptied of the sagas an
    earlier stack left under the default prefix (their workers are gone)."""
    from tests.stores import delete_prefix

    url = str(request.getfixturevalue("redis_cluster_url"))
    client = redis.RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1))
    try:
        delete_prefix(client, "sagaline")
    finally:
        client.close()
    return url


@pytest.fixture(scope="module", params=STACKS)
def stack(
    request: pytest.FixtureRequest,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The same tests on Redis + PostgreSQL, the embedded defaults, and the Redis store."""
    yield from make_stack(request.param, pg_url, redis_url, tmp_path_factory)


@pytest.fixture(scope="module")
def pg_stack(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Redis broker + PostgreSQL store, with short leases and a fast sweeper."""
    yield from make_stack(
        "redis+postgres",
        pg_url,
        redis_url,
        tmp_path_factory,
        {"SAGALINE_LEASE": "3", "SAGALINE_REDISPATCH_AFTER": "3"},
    )


# -- the Redis store's suites (test_redis_store, test_redis_layout, test_redis_gc) ----------


@pytest.fixture(params=["single", "cluster"])
def server(request: pytest.FixtureRequest) -> str:
    """The store URL of the test server: a single Redis, or the private cluster."""
    if request.param == "single":
        return redis_test_url()
    return str(request.getfixturevalue("redis_cluster_url"))


@pytest.fixture
def raw(server: str) -> Iterator[Any]:
    """A plain client of `server`."""
    client = raw_client(server)
    yield client
    client.close()


@pytest.fixture
def prefix(raw: Any) -> Iterator[str]:
    """A key prefix of the test's own on `server`, deleted after it."""
    name = f"sagaline-test-{uuid.uuid4().hex[:12]}"
    yield name
    delete_prefix(raw, name)
