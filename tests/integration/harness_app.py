"""Tiny Celery app used by ``test_harness.py`` to exercise :class:`WorkerProcess`.

Reads the broker from ``CELERY_BROKER_URL``; touches ``SAGALINE_READY_FILE`` when
the worker is ready.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

app = Celery("harness_app", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
)


@worker_ready.connect
def _touch_ready_file(**_: Any) -> None:
    # A plain Celery app (it tests the launcher itself): no init_app, whose hook does this.
    path = os.environ.get("SAGALINE_READY_FILE")
    if path:
        Path(path).touch()


@app.task(name="harness.record_pid")
def record_pid(redis_url: str, key: str) -> int:
    """Write this process's pid to ``key`` in Redis and return it."""
    pid = os.getpid()
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(key, pid, ex=600)
    finally:
        client.close()
    return pid
