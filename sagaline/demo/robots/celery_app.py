"""The robot fleet's Celery app object, set up for sagaline; `app.py` adds its tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

import sagaline

app = Celery("robots", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
sagaline.init_app(app)


@worker_ready.connect
def _announce_ready(**_: Any) -> None:
    # `sagaline demo` and the test harness wait for this file before starting sagas.
    path = os.environ.get("SAGALINE_READY_FILE")
    if path:
        Path(path).touch()
