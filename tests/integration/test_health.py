"""`sagaline health`: with the broker stopped, readiness fails within seconds while
liveness keeps passing (a broker outage must not restart workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

import sagaline
from sagaline.observability.health import check_liveness, check_readiness
from sagaline.testing import WorkerProcess
from tests.private_redis import PrivateRedis

APP = "tests.integration.metrics_app"
SAGALINE = str(Path(sys.executable).parent / "sagaline")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Deployment:
    broker: PrivateRedis
    worker: WorkerProcess
    env: dict[str, str]
    heartbeat: Path

    def health(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SAGALINE, "health", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            cwd=REPO,
        )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    broker = PrivateRedis()
    heartbeat = tmp_path / "heartbeat"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker.url,
        "SAGALINE_STORE_URL": f"sqlite:///{tmp_path}/state.db",
        "SAGALINE_HOME": str(tmp_path),
        "SAGALINE_HEARTBEAT_FILE": str(heartbeat),
        "SAGALINE_HEARTBEAT_INTERVAL": "1",
    }
    env.pop("SAGALINE_METRICS_PORT", None)
    worker = WorkerProcess(APP, env=env, concurrency=1, workdir=tmp_path / "worker")
    try:
        worker.start()
        yield Deployment(broker, worker, env, heartbeat)
    finally:
        worker.stop()
        broker.destroy()


def test_readiness_fails_and_liveness_passes_while_the_broker_is_down(
    deployment: Deployment, tmp_path: Path
) -> None:
    assert deployment.health("--liveness", "-A", APP, "--max-age", "5").returncode == 0
    ready = deployment.health("--readiness", "-A", APP)
    assert ready.returncode == 0, ready.stderr
    assert "ready" in ready.stdout

    deployment.broker.kill()
    client = Celery("probe", broker=deployment.broker.url)
    runtime = sagaline.init_app(client, store=deployment.env["SAGALINE_STORE_URL"], sweeper=False)
    began = time.monotonic()
    ok, message = check_readiness(runtime)
    took = time.monotonic() - began
    assert not ok and "broker" in message and "store" not in message, message
    assert took < 5.0, f"readiness took {took:.1f}s to fail"

    ready = deployment.health("--readiness", "-A", APP)
    assert ready.returncode == 1 and "broker" in ready.stderr, ready.stderr
    # Longer than --max-age after the outage began: the worker still beats, so a
    # liveness probe does not restart it for an outage that restarting cannot fix.
    time.sleep(6)
    live = deployment.health("--liveness", "-A", APP, "--max-age", "5")
    assert live.returncode == 0, live.stderr
    assert deployment.worker.is_running()
    # The same probe without -A reads the file from the environment, importing no app.
    assert deployment.health("--liveness", "--max-age", "5").returncode == 0

    deployment.broker.restart()
    ready = deployment.health("--readiness", "-A", APP)
    assert ready.returncode == 0, ready.stderr


def test_liveness_fails_once_the_worker_has_stopped(deployment: Deployment) -> None:
    assert check_liveness(deployment.heartbeat, max_age=5)[0]
    deployment.worker.stop()
    live = deployment.health("--liveness", "--max-age", "5")
    assert live.returncode == 1 and "no heartbeat file" in live.stderr


def test_a_heartbeat_older_than_max_age_fails_liveness(tmp_path: Path) -> None:
    stale = tmp_path / "hb"
    stale.touch()
    os.utime(stale, (time.time() - 120, time.time() - 120))
    ok, message = check_liveness(stale, max_age=60)
    assert not ok and "120s old" in message


def test_health_needs_exactly_one_probe() -> None:
    def health(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SAGALINE, "health", *args], capture_output=True, text=True, timeout=120, cwd=REPO
        )

    both = health("--liveness", "--readiness", "-A", APP)
    assert both.returncode == 2 and "give --liveness, or --readiness" in both.stderr
    assert health().returncode == 2
    no_app = health("--readiness")
    assert no_app.returncode == 2 and "-A" in no_app.stderr


def test_readiness_answers_in_time_when_the_store_never_replies() -> None:
    import socket

    # A server that takes connections and never replies: a store behind a dead link.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        runtime = sagaline.init_app(
            Celery("probe-silent", broker="memory://"),
            store=f"redis://127.0.0.1:{port}/0",
            sweeper=False,
        )
        began = time.monotonic()
        ok, message = check_readiness(runtime, timeout=1.0)
        took = time.monotonic() - began
    finally:
        silent.close()
    assert not ok and "store did not answer within 1s" in message, message
    assert "broker" not in message
    assert took < 3.0, f"readiness took {took:.1f}s"
