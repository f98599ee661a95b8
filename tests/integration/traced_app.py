"""A Celery app whose workers trace their sagas (OTLP/HTTP) and may log JSON.

Broker and store from CELERY_BROKER_URL and SAGALINE_STORE_URL; tracing from
SAGALINE_TRACING and the OTEL_* variables; TRACED_APP_CELERY_INSTRUMENTATION=1
adds opentelemetry-instrumentation-celery in each pool process; a step that
should hang on its first attempt (to be killed there) waits for SLOW_FIRST_ATTEMPT
seconds.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from opentelemetry import trace

import sagaline
from sagaline import Saga, StepResponse, saga_step

app = Celery("traced_app", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1)
sagaline.init_app(app)
log = logging.getLogger("shop.steps")
tracer = trace.get_tracer("shop")

if os.environ.get("TRACED_APP_CELERY_INSTRUMENTATION") == "1":

    @worker_process_init.connect(weak=False)
    def _instrument_celery(**_: Any) -> None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()


@app.task(name="traced.release")
def release(compensation_data: Any) -> None:
    log.info("releasing %s", compensation_data)


@saga_step(compensate=release)
@app.task(name="traced.reserve")
def reserve(order_id: str) -> StepResponse:
    # A span of the user's inside the step, and a log line: both must carry the step.
    with tracer.start_as_current_span("reserve stock"):
        log.info("reserving stock for %s", order_id)
    return StepResponse(output={"reserved": True}, compensation_data={"order_id": order_id})


@app.task(name="traced.refund")
def refund(compensation_data: Any) -> None:
    log.info("refunding %s", compensation_data)


@saga_step(compensate=refund)
@app.task(name="traced.charge")
def charge(order_id: str) -> dict[str, Any]:
    return {"charged": 10}


@app.task(name="traced.ship")
def ship(order_id: str) -> None:
    raise StepResponse.permanent_failure("no courier for " + order_id)


@app.task(name="traced.slow")
def slow(order_id: str) -> dict[str, Any]:
    step = sagaline.current_step()
    with tracer.start_as_current_span("slow work begins"):
        log.info("slow step, attempt %s", step.attempt)
    if step.attempt == 1:
        time.sleep(float(os.environ.get("SLOW_FIRST_ATTEMPT", "0")))
    return {"slow": step.attempt}


@app.task(name="traced.finish")
def finish(order_id: str) -> dict[str, Any]:
    return {"finished": True}


compensated = (
    Saga("traced_compensated")
    .add_step(reserve)
    .add_step(charge)
    .add_step(ship, no_compensation=True)
)
survives_kill = (
    Saga("traced_survives_kill")
    .add_step(reserve)
    .add_step(slow, no_compensation=True)
    .add_step(finish, no_compensation=True)
)
child = Saga("traced_child").add_step(finish, no_compensation=True)
parent = Saga("traced_parent").add_step(charge).add_saga(child)
