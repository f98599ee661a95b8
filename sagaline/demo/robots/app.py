"""The Celery app of the robot fleet: `sagaline worker -A sagaline.demo.robots.app`.

Broker from CELERY_BROKER_URL; without it, sagaline's server-less filesystem
broker in SAGALINE_HOME. State store from SAGALINE_STORE_URL (default: SQLite).
"""

from __future__ import annotations

import os

from celery import Celery

import sagaline

app = Celery("robots", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
sagaline.init_app(app)


# The tasks and the saga definition register themselves on import, in every process.
from . import sagas  # noqa: E402,F401
