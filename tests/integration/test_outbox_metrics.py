"""Outbox metrics served over HTTP by real processes: a prefork worker's /metrics (its
relay bootstep in the main process, optimistic sending in pool processes, both in
prometheus-client's multiprocess mode) and `sagaline relay --metrics-port`."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

pytest.importorskip("prometheus_client")

import sagaline
from sagaline.states import SagaStatus
from sagaline.stores.sql import SQLStore
from sagaline.testing import free_port, kill_pid, wait_until
from tests.harness import WorkerProcess, drop_database, shared_postgres_url
from tests.integration import outbox_app
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
SAGAS = 12  # two events each (order.debited, order.audit)
PLAIN = 5  # events published outside sagas: only a relay sends them


@pytest.fixture
def db() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_obm_{uuid.uuid4().hex[:10]}")
    SQLStore(url).migrate()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    outbox_app.metadata.create_all(engine)
    engine.dispose()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def streams(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(url).flushdb()
    return url


def delivered(streams: str, *names: str) -> int:
    client = redis.Redis.from_url(streams)
    try:
        return sum(int(client.xlen(n)) for n in names)
    finally:
        client.close()


def publish_plain(db: str, topic: str, n: int, keyed: bool = True) -> None:
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        for i in range(n):
            sagaline.outbox.publish(conn, topic, {"n": i}, key=f"k{i % 2}" if keyed else None)
    engine.dispose()


@pytest.mark.parametrize("relay", ["bootstep", "pool-only"])
def test_a_worker_serves_the_outbox_metrics(
    relay: str, db: str, streams: str, redis_url: str, tmp_path: Path
) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    env = {
        "SAGALINE_STORE_URL": db,
        "CELERY_BROKER_URL": broker,
        "SAGALINE_HOME": str(tmp_path),
        "CRASH_DIR": str(tmp_path),
        "SAGALINE_METRICS_PORT": str(port),
        # One stream per saga topic; events outside sagas to the stream "plain".
        "SAGALINE_OUTBOX_ROUTES": f"order.*={streams} t.*={streams}?stream=plain",
        # pool-only: no relay, so every event is sent by a pool process right after
        # its step's commit (optimistic sending).
        "SAGALINE_OUTBOX_RELAY": "true" if relay == "bootstep" else "false",
    }
    client = Celery("obm-client", broker=broker)
    runtime = sagaline.init_app(client, store=db, sweeper=False)
    worker = WorkerProcess(
        "tests.integration.outbox_app", env=env, concurrency=2, workdir=tmp_path / "worker"
    )
    worker.start()
    try:
        handles = [
            runtime.start_saga(outbox_app.pay, {"order_id": f"o{i}", "amount": 5})
            for i in range(SAGAS)
        ]
        plain = PLAIN if relay == "bootstep" else 0
        publish_plain(db, "t.e", plain)
        expected = 2 * SAGAS + plain
        wait_until(
            lambda: all(
                runtime.store.get_saga(h.saga_id).status == SagaStatus.COMPLETED for h in handles
            ),
            timeout=90,
            what="the sagas to complete",
        )
        names = ("order.debited", "order.audit", "plain")
        wait_until(lambda: delivered(streams, *names) >= expected, timeout=60, what="every event")
        sent = delivered(streams, *names)
        assert sent == expected

        def published(samples: Any) -> float:
            return total(samples, "sagaline_outbox_published_total")

        wait_until(
            lambda: published(scrape(port)) == sent, timeout=30, what="the published counter"
        )
        samples = scrape(port)
        assert published(samples) == sent
        assert total(samples, "sagaline_outbox_relay_lag_seconds_count") == sent
        assert total(samples, "sagaline_outbox_publish_failures_total") == 0
        # The saga metrics are still there beside them.
        assert total(samples, "sagaline_sagas_finished_total", saga=outbox_app.pay.name) > 0
        if relay == "bootstep":  # the relay of the main process reads the pending rows
            assert ("sagaline_outbox_pending", ()) in samples
    finally:
        worker.stop()
        runtime.store.close()


def test_sagaline_relay_serves_its_metrics(db: str, streams: str, tmp_path: Path) -> None:
    # Without keys, so that the first round takes them all: its pending count is 2.
    publish_plain(db, "t.e", 5, keyed=False)
    publish_plain(db, "x.e", 2, keyed=False)  # routed to a closed port: they stay pending
    port = free_port()
    args = [
        sys.executable,
        "-c",
        "from sagaline.cli import main; main()",
        "relay",
        "--store",
        db,
        "--route",
        f"t.*={streams}?stream=cli",
        "--route",
        f"x.*=redis://127.0.0.1:{free_port()}/0",
        "--backoff",
        "600",
        "--metrics-port",
        str(port),
    ]
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    try:

        def served() -> dict[Any, float] | None:
            assert proc.poll() is None, log.read_text()
            try:
                samples = scrape(port)
            except OSError:
                return None
            if ("sagaline_outbox_pending", ()) not in samples:
                return None
            return samples

        wait_until(lambda: served() is not None, timeout=30, what="the relay's /metrics")
        wait_until(lambda: delivered(streams, "cli") == 5, timeout=30, what="5 events")
        # The gauge is read after the first round (which sent the 5, and failed the 2).
        wait_until(
            lambda: total(served() or {}, "sagaline_outbox_pending") == 2,
            timeout=30,
            what="the pending gauge",
        )
        samples = served()
        assert samples is not None
        assert total(samples, "sagaline_outbox_published_total") == 5
        assert total(samples, "sagaline_outbox_publish_failures_total") == 2
        assert total(samples, "sagaline_outbox_oldest_age_seconds") >= 0
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid, signal.SIGTERM)
            proc.wait(15)
    assert proc.returncode == 0, log.read_text()


def test_a_relay_metrics_port_without_prometheus_client_names_the_extra(
    tmp_path: Path,
) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "sys.argv = ['sagaline', 'relay', '--route', 't=redis://127.0.0.1:1/0',"
        " '--store', 'sqlite:///never.db', '--metrics-port', '9540']\n"
        "from sagaline.cli import main; main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "SAGALINE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 1
    assert "pip install 'sagaline[prometheus]'" in out.stderr, out.stderr
    assert not (tmp_path / "never.db").exists()
