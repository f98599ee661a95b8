"""The shop's Celery app: `sagaline worker -A examples.orders.app`."""

from __future__ import annotations

import os

from celery import Celery

import sagaline

app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
sagaline.init_app(app)


from . import tasks  # noqa: E402,F401  (registers the tasks and the saga)
