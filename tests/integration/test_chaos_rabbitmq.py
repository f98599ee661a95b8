"""Chaos on RabbitMQ: the broker node goes down and comes back while 50 sagas run.

The sagas (`chaos_app.fork`: a, then b and c in parallel; every other one fails at
its last step and compensates) run on two prefork workers against a private
RabbitMQ node (its own node name, ports, data and epmd, stopped by pid; one for the
session, each test in a vhost of its own on it), once with
classic and once with quorum queues, with the store and the ledger on the shared
PostgreSQL. The node is stopped gracefully (what an upgrade or a restart by its
supervisor does), or killed with SIGKILL on quorum queues (a crash: only what the
broker confirmed, and so wrote to disk, survives), and started again on the same
port with the same data.

Every saga must then be terminal within the settle time, each consistent (see
`test_chaos.check_outcome`), none lost from the store, and no step body may run
twice: nothing was killed, so fencing plus durable queues leave no room for it.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PrivateRabbitMQ, drop_database, shared_postgres_url, wait_until
from tests.integration.test_chaos import (
    SEED,
    Cluster,
    _report_in_the_test_output,  # noqa: F401 - autouse: the summary goes to the output
    check_outcome,
    say,
    settle,
)

pytestmark = pytest.mark.chaos

SAGAS = 50


@pytest.fixture
def chaos_db() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_chaos_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def rabbitmq(private_rabbitmq: PrivateRabbitMQ) -> PrivateRabbitMQ:
    """The session's private node, running (a test that failed may have left it down)."""
    private_rabbitmq.start()  # a no-op while it runs
    return private_rabbitmq


@pytest.fixture
def vhost(rabbitmq: PrivateRabbitMQ) -> tuple[str, str]:
    """A fresh vhost on the session's node: ``(name, AMQP URL)``."""
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    return name, rabbitmq.add_vhost(name)


@pytest.mark.parametrize(
    ("queue_type", "how"), [("classic", "stop"), ("quorum", "stop"), ("quorum", "kill")]
)
def test_rabbitmq_restarted_mid_run(
    queue_type: str,
    how: str,
    rabbitmq: PrivateRabbitMQ,
    vhost: tuple[str, str],
    chaos_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    label = f"rabbitmq/{queue_type}/{how}"
    rng = random.Random(SEED + 4)
    # Read by chaos_app in the workers; the client below is told the same.
    monkeypatch.setenv("SAGALINE_TEST_QUEUE_TYPE", queue_type)
    vhost_name, amqp_url = vhost
    cluster = Cluster(amqp_url, chaos_db, chaos_db, tmp_path)
    cluster.runtime.app.conf.task_default_queue_type = queue_type
    try:
        cluster.start_workers()
        assert rabbitmq.queue_types(vhost_name).get("celery") == queue_type
        started = cluster.start_sagas(SAGAS, rng)
        t0 = time.monotonic()
        time.sleep(rng.uniform(1.0, 2.0))
        in_flight = cluster.not_terminal()
        if how == "kill":
            rabbitmq.kill()  # a crash: no goodbye to the clients, no clean shutdown
        else:
            rabbitmq.stop()  # graceful: every connection closed, durable data kept
        down_at = time.monotonic() - t0
        wait_until(lambda: not rabbitmq.is_running(), timeout=15, what="rabbitmq down")
        time.sleep(2.0)
        rabbitmq.start()  # same node, port and data
        last_restart = time.monotonic()
        say(
            f"\n[{label}] node down ({how}) at +{down_at:.2f}s with {in_flight} sagas in "
            f"flight, accepting connections again after "
            f"{time.monotonic() - t0 - down_at:.2f}s"
        )
        assert in_flight > 0
        assert all(w.is_running() for w in cluster.live), "a worker died with the broker"
        unsettled = settle(cluster, last_restart, label)
        # Nothing acknowledged was lost: every saga started is in the store.
        counts = cluster.runtime.store.count_by_status(cluster.saga.name)
        assert sum(counts.values()) == len(started), f"sagas in the store: {counts}"
        duplicates = check_outcome(cluster, started, [], label, unsettled)
        assert duplicates == 0
    finally:
        cluster.close()
