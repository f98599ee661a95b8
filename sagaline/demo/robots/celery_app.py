"""The robot fleet's Celery app object, set up for sagaline; `app.py` adds its tasks."""

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
