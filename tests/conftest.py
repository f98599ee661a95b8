"""Shared pytest fixtures (real servers; see ``tests/harness.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import WorkerProcess, drop_database, shared_postgres_url
from tests.stores import redis_test_url

# pytester runs user-style test files (the pytest plugin's own tests, tests/plugin).
pytest_plugins = ["pytester"]

WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Shared Redis (``$SAGALINE_TEST_REDIS_URL``), database 15, flushed at session start."""
    import redis

    url = redis_test_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A private Redis Cluster of three masters for the session: ``redis+cluster://...``,
    the store URL. Its nodes are killed by pid at the end."""
    from tests.private_redis_cluster import PrivateRedisCluster

    with PrivateRedisCluster() as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def private_rabbitmq() -> Iterator[Any]:
    """A private RabbitMQ node for the session's tests that stop, kill and restart one (a
    boot takes 10-30 s here): each takes a vhost of its own on it (`add_vhost`) and leaves
    the node running. Killed by pid, its directory deleted, at the end."""
    from tests.private_rabbitmq import PrivateRabbitMQ

    node = PrivateRabbitMQ()
    try:
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database ``sagaline_test_<random>`` on the shared PostgreSQL; dropped at end."""
    url = shared_postgres_url(f"sagaline_test_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def tmp_sqlite_url(tmp_path: Path) -> str:
    """``sqlite:///<tmp_path>/state.db``."""
    return f"sqlite:///{tmp_path}/state.db"


@pytest.fixture
def worker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerFactory]:
    """``worker_factory(app_module, *, start=True, **WorkerProcess kwargs) -> WorkerProcess``.

    Logs go under pytest's tmp dir (``worker.log``). Every worker created is
    stopped (SIGTERM, then SIGKILL of its process group) at teardown.
    """
    workers: list[WorkerProcess] = []

    def make(app_module: str, *, start: bool = True, **kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("worker"))
        w = WorkerProcess(app_module, **kwargs)
        workers.append(w)
        if start:
            w.start()
        return w

    try:
        yield make
    finally:
        for w in reversed(workers):
            try:
                w.stop()
            except Exception:
                w.kill()
