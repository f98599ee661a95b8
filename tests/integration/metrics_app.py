"""A Celery app for the metrics and health tests: one saga whose last step can fail, so
that its first two steps are compensated. Broker from CELERY_BROKER_URL, store from
SAGALINE_STORE_URL, metrics port from SAGALINE_METRICS_PORT."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import sagaline
from sagaline import Saga

app = Celery("metrics_app", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1)
sagaline.init_app(app, sweep_interval=1.0)


@app.task(name="m.undo")
def undo(compensation_data: Any = None) -> None:
    return None


@app.task(name="m.reserve")
def reserve(order: int) -> dict[str, Any]:
    return {"reserved": order}


@app.task(name="m.charge")
def charge(order: int) -> dict[str, Any]:
    return {"charged": order}


@app.task(name="m.ship")
def ship(order: int, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise RuntimeError(f"order {order}: no courier")
    return {"shipped": order}


order_saga = (
    Saga("metrics_order", timeout=3600)
    .add_step(reserve, compensate=undo)
    .add_step(charge, compensate=undo)
    .add_step(ship, no_compensation=True)
)
