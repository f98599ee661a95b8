"""Tests proving the process harness itself works against real servers."""

from __future__ import annotations

import os
import signal
import time
import uuid

import psycopg
import pytest
import redis

from tests.conftest import WorkerFactory
from tests.harness import (
    PrivatePostgres,
    PrivateRabbitMQ,
    PrivateRedis,
    _pids_in_group,
    _rabbitmqctl,
    drop_database,
    pid_alive,
    rabbitmq_vhost,
    shared_postgres_url,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

APP = "tests.integration.harness_app"


def _psycopg_dsn(url: str) -> str:
    """SQLAlchemy URL -> libpq URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# -- Redis ------------------------------------------------------------------- #


def test_private_redis_start_set_restart_kill() -> None:
    with PrivateRedis() as srv:
        assert srv.url == f"redis://127.0.0.1:{srv.port}/0"
        client = redis.Redis.from_url(srv.url, socket_timeout=5)
        assert client.set("k", "v")
        assert client.get("k") == b"v"
        port, old_pid = srv.port, srv.pid

        srv.restart()
        assert srv.port == port
        assert srv.pid != old_pid
        assert client.ping()

        pid = srv.pid
        assert pid is not None
        srv.kill()
        assert not pid_alive(pid)
        assert not srv.is_running()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(srv.url, socket_connect_timeout=1).ping()
        client.close()


def test_private_redis_appendonly_survives_kill() -> None:
    with PrivateRedis(appendonly=True) as srv:
        client = redis.Redis.from_url(srv.url, socket_timeout=5)
        client.set("durable", "1")
        client.close()
        srv.kill()
        srv.start()
        client = redis.Redis.from_url(srv.url, socket_timeout=5)
        assert client.get("durable") == b"1"
        client.close()


# -- PostgreSQL -------------------------------------------------------------- #


def test_private_postgres_query_restart_kill() -> None:
    with PrivatePostgres(dbname="harness") as pg:
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/harness"
        with psycopg.connect(_psycopg_dsn(pg.url), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")

        pg.restart()
        with psycopg.connect(_psycopg_dsn(pg.url)) as conn:
            row = conn.execute("SELECT x FROM t").fetchone()
        assert row == (42,)

        pid = pg.pid
        assert pid is not None
        pg.kill()
        assert not pid_alive(pid)
        assert not pg.is_running()
        pg.start()  # crash recovery on the same port
        with psycopg.connect(_psycopg_dsn(pg.url)) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (42,)
        pg.stop()
        assert not pg.is_running()


# -- RabbitMQ ---------------------------------------------------------------- #


def _publish_and_count(url: str, queue_type: str, publish: bool) -> int:
    """Declare the durable queue `q`, publish one persistent message (confirmed) if asked;
    return how many messages it holds."""
    from kombu import Connection, Queue

    queue = Queue("q", durable=True, queue_arguments={"x-queue-type": queue_type})
    with Connection(url, transport_options={"confirm_publish": True}, connect_timeout=5) as conn:
        bound = queue(conn.channel())
        bound.declare()
        if publish:
            conn.Producer().publish(
                {"n": 1}, routing_key="q", delivery_mode=2, declare=[queue], serializer="json"
            )
        _, count, _ = bound.queue_declare(passive=True)
        return int(count)


def test_private_rabbitmq_keeps_confirmed_messages_across_a_crash() -> None:
    # (The chaos tests stop and start it gracefully; a node boots in 10-30 s here.)
    with PrivateRabbitMQ() as node:
        assert node.port != 5672 and not node.nodename.startswith("rabbit@")
        assert _publish_and_count(node.url, "quorum", publish=False) == 0
        # RabbitMQ 3.10 does not bring back a quorum queue killed in its first moments
        # (its Raft member is not on disk yet): let the new queue settle first.
        time.sleep(3)
        assert _publish_and_count(node.url, "quorum", publish=True) == 1
        group = node.pid
        assert group is not None and _pids_in_group(group)
        node.kill()  # the node's whole process group goes
        assert not _pids_in_group(group) and not node.is_running()
        node.start()  # same name, port and data
        # The queue recovers its log after the listener opens: it reads 0 for a moment.
        wait_until(
            lambda: _publish_and_count(node.url, "quorum", publish=False) == 1,
            timeout=30,
            interval=0.5,
            what="the confirmed message to be back",
        )
        assert node.queue_types() == {"q": "quorum"}
        epmd, directory = node.epmd_pid, node.dir
        assert epmd is not None and pid_alive(epmd)
    assert not pid_alive(epmd) and not directory.exists()


def test_rabbitmq_vhost_is_private_and_deleted_afterwards() -> None:
    with rabbitmq_vhost() as first, rabbitmq_vhost() as second:
        assert _publish_and_count(first, "classic", publish=True) == 1
        assert _publish_and_count(second, "classic", publish=False) == 0
        names = {u.rsplit("/", 1)[1] for u in (first, second)}
        assert names <= set(_rabbitmqctl("list_vhosts", "-q").split())
    assert not names & set(_rabbitmqctl("list_vhosts", "-q").split())


def test_shared_postgres_url_creates_database() -> None:
    name = f"sagaline_harness_{uuid.uuid4().hex[:8]}"
    url = shared_postgres_url(name)
    try:
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        assert shared_postgres_url(name) == url  # idempotent
        with psycopg.connect(_psycopg_dsn(url)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        drop_database(url)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_psycopg_dsn(url), connect_timeout=5).close()


def test_pg_url_fixture(pg_url: str) -> None:
    with psycopg.connect(_psycopg_dsn(pg_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- Celery worker ----------------------------------------------------------- #


def _wait_for_key(client: redis.Redis, key: str, timeout: float = 30.0) -> int:
    wait_until(lambda: client.get(key) is not None, timeout=timeout, what=f"redis key {key}")
    value = client.get(key)
    assert value is not None
    return int(value)


def test_worker_executes_task_and_kill_leaves_nothing(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    from celery import Celery

    queue = f"harness-{uuid.uuid4().hex[:8]}"
    worker = worker_factory(
        APP, env={"CELERY_BROKER_URL": redis_url}, concurrency=2, queues=[queue]
    )
    assert worker.is_running()

    children = worker.child_pids()
    wait_until(lambda: len(worker.child_pids()) == 2, timeout=20, what="2 pool children")
    children = worker.child_pids()
    assert len(children) == 2
    assert all(pid_alive(p) for p in children)

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    key = f"harness:pid:{uuid.uuid4().hex}"
    sender = Celery(broker=redis_url)
    try:
        sender.send_task("harness.record_pid", args=[redis_url, key], queue=queue)
        pid = _wait_for_key(client, key)
    finally:
        sender.close()
        client.close()
    assert pid in children  # executed in a pool child, not the main process
    assert "harness.record_pid" in worker.log_text()

    group = worker.group_pids()
    assert worker.pid in group and set(children) <= set(group)
    worker.kill()
    assert worker.group_pids() == []
    assert not any(pid_alive(p) for p in [worker.pid, *children])
    assert worker.returncode == -signal.SIGKILL


def test_worker_stop_is_graceful(worker_factory: WorkerFactory, redis_url: str) -> None:
    worker = worker_factory(
        APP, env={"CELERY_BROKER_URL": redis_url}, pool="solo", queues=["harness-stop"]
    )
    assert worker.child_pids() == []
    t0 = time.monotonic()
    worker.stop()
    assert time.monotonic() - t0 < 16
    assert worker.group_pids() == []
    assert worker.returncode is not None


def test_worker_start_failure_reports_log(worker_factory: WorkerFactory) -> None:
    from tests.harness import HarnessError

    with pytest.raises(HarnessError, match="exited"):
        worker_factory(
            "tests.integration.no_such_module",
            env={"CELERY_BROKER_URL": "memory://"},
            pool="solo",
            ready_timeout=30,
        )


def test_tmp_sqlite_url(tmp_sqlite_url: str) -> None:
    assert tmp_sqlite_url.startswith("sqlite:///") and tmp_sqlite_url.endswith("/state.db")
    assert os.path.isdir(tmp_sqlite_url[len("sqlite:///") :].rsplit("/", 1)[0])


def test_worker_context_manager(redis_url: str) -> None:
    from tests.harness import WorkerProcess

    with WorkerProcess(
        APP, env={"CELERY_BROKER_URL": redis_url}, pool="solo", queues=["harness-ctx"]
    ) as worker:
        assert worker.is_running()
        pid, workdir = worker.pid, worker.dir
    assert not pid_alive(pid)
    assert worker.group_pids() == []
    assert not workdir.exists()
