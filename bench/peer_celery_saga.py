"""celery-saga's side of `python -m bench --peers`: the 4-step no-op saga, on the bench's Redis.

The Celery app of the celery-saga worker (``celery -A bench.peer_celery_saga worker
-Q bench.peer``) and of the benchmark driver, which sends the sagas. celery-saga keeps
each saga's state as one JSON document in Redis (``BENCH_PEER_STATE_URL``) and
drives the steps with a Celery chain of its own tasks on the broker
(``BENCH_BROKER_URL``, the benchmark's private Redis); it needs no result backend.
The steps are the same no-ops as sagaline's, with a no-op compensation each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from celery_saga import Saga, set_default_backend
from celery_saga.backends import RedisSagaBackend

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
STATE_URL = os.environ.get("BENCH_PEER_STATE_URL", BROKER_URL)
QUEUE = "bench.peer"
STEPS = 4

app = Celery("bench_peer", broker=BROKER_URL, set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_ignore_result=True,
)

backend = RedisSagaBackend(url=STATE_URL)
set_default_backend(backend)


@app.task(name="bench.peer.noop")
def noop(**context: Any) -> None:
    return None


@app.task(name="bench.peer.undo")
def undo(compensation_data: Any = None) -> None:
    return None


saga = Saga("bench.noop4")
for _ in range(STEPS):
    saga.add_step(noop, compensate=undo)


@worker_ready.connect
def _touch_ready_file(**_: Any) -> None:
    path = os.environ.get("SAGALINE_READY_FILE")
    if path:
        Path(path).touch()
