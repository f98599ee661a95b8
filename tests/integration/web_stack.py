"""A real `sagaline web` server process, a real worker, PostgreSQL and Redis, for web tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from sagaline.demo.robots.sagas import exploration_input
from tests.harness import REPO_ROOT, WorkerProcess, wait_until

SAGALINE = str(Path(sys.executable).parent / "sagaline")
# The robot fleet's app, with the web tests' own sagas (web_app.py).
APP = "tests.integration.web_app"
TOKEN = "operator-token-0123456789"
READ_TOKEN = "reader-token-0123456789"
TERMINAL = {"COMPLETED", "COMPENSATED", "FAILED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_url(redis_url: str, db: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", ""))


@dataclass
class WebStack:
    base: str
    env: dict[str, str]
    store_url: str
    server: subprocess.Popen[bytes]
    worker: WorkerProcess

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def start(self, key: str | None = None, **options: Any) -> str:
        area = options.pop("area", "sector")
        headers = {"Idempotency-Key": key} if key else {}
        with self.client() as c:
            r = c.post(
                "/api/v1/sagas/robot_exploration",
                json=exploration_input(area, **options),
                headers=headers,
            )
        assert r.status_code == 201, r.text
        saga_id: str = r.json()["saga_id"]
        return saga_id

    def start_saga(self, name: str, input: dict[str, Any]) -> str:
        with self.client() as c:
            r = c.post(f"/api/v1/sagas/{name}", json=input)
        assert r.status_code == 201, r.text
        saga_id: str = r.json()["saga_id"]
        return saga_id

    def saga(self, saga_id: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/api/v1/sagas/{saga_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def wait_status(self, saga_id: str, statuses: set[str], timeout: float = 60) -> None:
        wait_until(
            lambda: self.saga(saga_id)["saga"]["status"] in statuses,
            timeout=timeout,
            interval=0.2,
            what=f"saga {saga_id} in {sorted(statuses)}",
        )

    def sagaline(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SAGALINE, *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def start_server(
    env: dict[str, str], port: int, *args: str, app: str | None = APP
) -> subprocess.Popen[bytes]:
    """`sagaline web` on `port` (read only without `app`), once it answers."""
    proc = subprocess.Popen(
        [SAGALINE, "web", *(["-A", app] if app else []), "--port", str(port), *args],
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(
                f"sagaline web exited {proc.returncode}: "
                f"{proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError("sagaline web did not answer within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    if proc.stderr is not None:
        proc.stderr.close()


def web_stack(pg_url: str, redis_url: str, home: Path) -> Iterator[WebStack]:
    broker = broker_url(redis_url, 12)
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = {
        **os.environ,
        "SAGALINE_HOME": str(home),
        "SAGALINE_STORE_URL": pg_url,
        "CELERY_BROKER_URL": broker,
        "SAGALINE_SWEEP_INTERVAL": "1",
        "SAGALINE_WEB_TOKEN": TOKEN,
        "SAGALINE_WEB_READ_TOKEN": READ_TOKEN,
    }
    worker = WorkerProcess(APP, env=env, concurrency=3, workdir=home / "worker")
    worker.start()
    port = free_port()
    try:
        server = start_server(env, port)
    except BaseException:
        worker.stop()
        raise
    try:
        yield WebStack(f"http://127.0.0.1:{port}", env, pg_url, server, worker)
    finally:
        stop_server(server)
        worker.stop()
