"""The Celery app that integration tests run in real worker processes.

Broker from CELERY_BROKER_URL (default: the embedded filesystem transport),
store from SAGALINE_STORE_URL; steps and compensations write ledger rows to the
PostgreSQL database in LEDGER_URL, so that tests check outcomes from data.
"""

from __future__ import annotations

import base64
import os
import pickle
import time
from typing import Any

import psycopg
from celery import Celery
from celery.utils.log import get_task_logger

import sagaline
from sagaline import Retry, Saga, StepResponse, saga_step

app = Celery("sagas_app", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    include=["tests.integration.poison_sagas"],
    worker_task_log_format="[%(levelname)s/%(processName)s] %(task_name)s[%(task_id)s] "
    "saga=%(saga_id)s step=%(saga_step)s: %(message)s",
)
if os.environ.get("SAGALINE_TEST_QUEUE_TYPE"):  # "quorum" on RabbitMQ
    app.conf.task_default_queue_type = os.environ["SAGALINE_TEST_QUEUE_TYPE"]
task_log = get_task_logger(__name__)
sagaline.init_app(app, sweep_interval=float(os.environ.get("SAGALINE_SWEEP_INTERVAL", "1")))

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    id bigserial PRIMARY KEY,
    saga_id text NOT NULL,
    step text NOT NULL,
    action text NOT NULL,
    data jsonb,
    started double precision,
    finished double precision,
    pid int
)"""


def ledger_dsn() -> str:
    url = os.environ["LEDGER_URL"]
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def record(
    saga_id: str, step: str, action: str, data: Any = None, started: float | None = None
) -> None:
    with psycopg.connect(ledger_dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ledger (saga_id, step, action, data, started, finished, pid) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                saga_id,
                step,
                action,
                psycopg.types.json.Jsonb(data),
                started,
                time.time(),
                os.getpid(),
            ),
        )


# -- a four-step saga whose steps and compensations write ledger rows ---------------


@app.task(name="t.undo")
def undo(compensation_data: Any, saga_id: str) -> None:
    record(saga_id, compensation_data["step"], "undo", compensation_data)


def _apply(step: str, saga_id: str, fail_at: str | None, value: int) -> StepResponse:
    if fail_at == step:
        raise RuntimeError(f"{step} failed on purpose")
    task_log.info("applying %s", step)
    record(saga_id, step, "do", {"value": value})
    return StepResponse(
        output={f"{step}_done": True}, compensation_data={"step": step, "value": value}
    )


@saga_step(compensate=undo)
@app.task(name="t.s1")
def s1(saga_id: str, value: int, fail_at: str | None = None) -> StepResponse:
    return _apply("s1", saga_id, fail_at, value)


@saga_step(compensate="t.undo")
@app.task(name="t.s2")
def s2(saga_id: str, value: int, s1_done: bool, fail_at: str | None = None) -> StepResponse:
    return _apply("s2", saga_id, fail_at, value + 1)


@saga_step(compensate="t.undo")
@app.task(name="t.s3")
def s3(saga_id: str, value: int, fail_at: str | None = None) -> StepResponse:
    return _apply("s3", saga_id, fail_at, value + 2)


@saga_step(compensate="t.undo")
@app.task(name="t.s4")
def s4(saga_id: str, value: int, fail_at: str | None = None) -> StepResponse:
    return _apply("s4", saga_id, fail_at, value + 3)


four_steps = Saga("four_steps").add_step(s1).add_step(s2).add_step(s3).add_step(s4)
if os.environ.get("SAGALINE_TEST_VARIANT"):  # a worker deployed with other code for it
    four_steps.add_step(s1, name="s5")


# -- a DAG a -> (b, c) -> d with recorded execution windows ---------------------------


@app.task(name="t.window")
def window(saga_id: str, fail_c: bool = False, sleep: float = 0.5, **ctx: Any) -> dict[str, Any]:
    step = sagaline.current_step().step
    started = time.time()
    time.sleep(sleep if step in ("b", "c") else 0)
    if step == "c" and fail_c:
        raise RuntimeError("c failed on purpose")
    record(
        saga_id, step, "do", {"seen": sorted(k for k in ctx if k.endswith("_out"))}, started=started
    )
    return {f"{step}_out": step}


@app.task(name="t.window_undo")
def window_undo(saga_id: str, compensation_data: Any) -> None:
    record(saga_id, sagaline.current_step().step, "undo", compensation_data)


dag = (
    Saga("dag")
    .add_step(window, name="a", compensate=window_undo)
    .add_step(window, name="b", compensate=window_undo)
    .add_step(window, name="c", compensate=window_undo, depends_on=["a"])
    .add_step(window, name="d", compensate=window_undo, depends_on=["b", "c"])
)


# -- keyword filtering and context visibility ------------------------------------------


@app.task(name="t.narrow")
def narrow(saga_id: str, order_id: str) -> dict[str, Any]:
    record(saga_id, "narrow", "kwargs", {"order_id": order_id})
    return {"narrow_out": 1}


@app.task(name="t.wide")
def wide(**kwargs: Any) -> dict[str, Any]:
    record(kwargs["saga_id"], sagaline.current_step().step, "kwargs", kwargs)
    return {f"{sagaline.current_step().step}_out": 2}


@app.task(name="t.unjson")
def unjson(saga_id: str) -> Any:
    return {"when": object()}


kwargs_probe = (
    Saga("kwargs_probe")
    .add_step(narrow, no_compensation=True)
    .add_step(wide, name="sibling_a", no_compensation=True)
    .add_step(wide, name="sibling_b", no_compensation=True, depends_on=["narrow"])
    .add_step(wide, name="after_a", no_compensation=True, depends_on=["sibling_a"])
)

bad_output = Saga("bad_output").add_step(s1).add_step(unjson, no_compensation=True)


@app.task(name="t.flaky")
def flaky(saga_id: str, fail_times: int) -> dict[str, Any]:
    attempt = sagaline.current_step().attempt
    record(saga_id, "flaky", "attempt", {"attempt": attempt})
    if attempt <= fail_times:
        raise ConnectionError(f"attempt {attempt} failed")
    return {"flaky_attempts": attempt}


retrying = Saga("retrying").add_step(
    flaky, no_compensation=True, retry=Retry(max_attempts=3, backoff=0.2)
)

# Retries 1 s then 2 s (+/- 10 %) after the failed attempts: long enough to measure.
backing_off = Saga("backing_off").add_step(
    flaky, no_compensation=True, retry=Retry(max_attempts=3, backoff=1.0, factor=2.0)
)

SLOW_BACKOFF = 6.0
slow_backoff = Saga("slow_backoff").add_step(
    flaky, no_compensation=True, retry=Retry(max_attempts=2, backoff=SLOW_BACKOFF, jitter=0)
)


# -- recovery: timeouts, deadlines, cancel, failing compensations, pivots ----------------

SWITCHES_DDL = "CREATE TABLE IF NOT EXISTS switches (name text PRIMARY KEY, remaining int)"


def take_failure(name: str) -> bool:
    """True while the switch `name` has failures left (-1: fail forever); uses one up."""
    with psycopg.connect(ledger_dsn(), autocommit=True) as conn:
        conn.execute(SWITCHES_DDL)
        row = conn.execute(
            "UPDATE switches SET remaining = remaining - 1 WHERE name = %s "
            "AND remaining > 0 RETURNING remaining",
            (name,),
        ).fetchone()
        if row is not None:
            return True
        forever = conn.execute(
            "SELECT 1 FROM switches WHERE name = %s AND remaining < 0", (name,)
        ).fetchone()
        return forever is not None


@app.task(name="t.sleepy")
def sleepy(saga_id: str, seconds: float) -> StepResponse:
    step = sagaline.current_step().step
    started = time.time()
    time.sleep(seconds)
    record(saga_id, step, "do", {"step": step}, started=started)
    return StepResponse(output={f"{step}_slept": seconds}, compensation_data={"step": step})


@app.task(name="t.fragile_undo")
def fragile_undo(saga_id: str, compensation_data: Any, switch: str) -> None:
    step = sagaline.current_step().step
    record(saga_id, step, "undo_attempt", {"attempt": sagaline.current_step().attempt})
    if take_failure(switch):
        raise ConnectionError(f"compensation of {step} failed (switch {switch})")
    record(saga_id, step, "undo", compensation_data)


@app.task(name="t.forward_flaky")
def forward_flaky(saga_id: str, switch: str) -> dict[str, Any]:
    record(saga_id, "after_pivot", "attempt", {"attempt": sagaline.current_step().attempt})
    if take_failure(switch):
        raise ConnectionError("downstream unavailable")
    return {"after_pivot": "done"}


timeout_saga = (
    Saga("timeout_saga")
    .add_step(s1)
    .add_step(
        sleepy, name="slow", compensate=undo, timeout=1, retry=Retry(max_attempts=2, backoff=0.1)
    )
)

deadline_saga = (
    Saga("deadline_saga", timeout=2).add_step(s1).add_step(sleepy, name="slow", compensate=undo)
)

cancel_saga = (
    Saga("cancel_saga").add_step(s1).add_step(sleepy, name="slow", compensate=undo).add_step(s3)
)

fragile = (
    Saga("fragile")
    .add_step(
        s1,
        compensate=fragile_undo,
        compensation_retry=Retry(max_attempts=5, backoff=0.2, factor=1.5),
    )
    .add_step(s2, compensate=fragile_undo, compensation_retry=Retry(max_attempts=2, backoff=0.2))
    .add_step(s3)
)

pivoting = (
    Saga("pivoting", pivot_retry=Retry(max_attempts=6, backoff=0.2, factor=1.5))
    .add_step(s1)
    .add_step(s2, pivot=True)
    .add_step(forward_flaky, no_compensation=True)
)

flaky_compensation = (
    Saga("flaky_compensation")
    .add_step(
        s1,
        compensate=fragile_undo,
        compensation_retry=Retry(max_attempts=5, backoff=0.2, factor=1.5),
    )
    .add_step(s4)
)


# -- the functional API, conditions and child sagas -------------------------------------


@app.task(name="t.validate_order")
def validate_order(saga_id: str, order_id: str, amount: float) -> dict[str, Any]:
    record(saga_id, "validate_order", "do")
    return {"validated": True}


@app.task(name="t.refund_payment")
def refund_payment(saga_id: str, compensation_data: Any) -> None:
    record(saga_id, "charge_payment", "undo", compensation_data)


@saga_step(compensate=refund_payment)
@app.task(name="t.charge_payment")
def charge_payment(saga_id: str, order_id: str, amount: float) -> StepResponse:
    txn = f"txn-{sagaline.current_step().idempotency_key}"
    record(saga_id, "charge_payment", "do", {"txn": txn})
    return StepResponse(
        output={"transaction_id": txn}, compensation_data={"transaction_id": txn, "amount": amount}
    )


@app.task(name="t.send_confirmation")
def send_confirmation(
    saga_id: str, order_id: str, transaction_id: str, fail_confirmation: bool = False
) -> dict[str, Any]:
    if fail_confirmation:
        raise RuntimeError("mail server down")
    record(saga_id, "send_confirmation", "do", {"txn": transaction_id})
    return {"confirmed": True}


@sagaline.saga("order_saga_fn")
def order_saga_fn(input: Any) -> Any:
    order = sagaline.step(validate_order, input)
    payment = sagaline.step(charge_payment, order)
    sagaline.step(send_confirmation, payment)
    return payment


@sagaline.saga("independent_fn")
def independent_fn(input: Any) -> Any:
    left = sagaline.step(window, input, name="b")
    right = sagaline.step(window, input, name="c")
    return {"left": left["b_out"], "right": right["c_out"]}


conditional = (
    Saga("conditional")
    .add_step(s1)
    .add_step(s2, when=lambda ctx: ctx.get("express", False))
    .add_step(s3, depends_on=["s1"])
    .add_step(s4, depends_on=["s2", "s3"])
)

child_saga = Saga("child_saga").add_step(s2).add_step(s3)

parent_saga = Saga("parent_saga").add_step(s1).add_saga(child_saga, name="child").add_step(s4)

slow_child = Saga("slow_child").add_step(s2).add_step(sleepy, name="slow", compensate=undo)

graceful_parent = (
    Saga("graceful_parent", failure_strategy=sagaline.FAIL_FAST_WITH_GRACE(grace=1))
    .add_step(s1)
    .add_saga(slow_child, name="child")
    .add_step(s4, depends_on=["s1"])
)


# -- hostile outputs (test_hostile_input.py) ---------------------------------------------


@app.task(name="t.returns")
def returns(saga_id: str, blob: str = "", deep: int = 0) -> Any:
    """Returns what the test asks for, JSON or not: the value pickled in `blob`, or
    `deep` objects nested inside each other (too deep for the test to pickle)."""
    if deep:
        value: Any = "bottom"
        for _ in range(deep):
            value = {"d": value}
        return value
    return pickle.loads(base64.b64decode(blob))


@app.task(name="t.after")
def after(**ctx: Any) -> dict[str, Any]:
    # Receives the whole context, so the output of `returns` travels in its message.
    return {"after_saw": sorted(ctx)}


hostile = (
    Saga("hostile")
    .add_step(s1)
    .add_step(returns, no_compensation=True)
    .add_step(after, no_compensation=True)
)
