"""The order saga, as in the celery-saga README: builder API, @saga_step, StepResponse.

Steps announce what happened as `order.*` events through the transactional outbox
(`sagaline.step_transaction`): an event commits exactly when its step completes.
Set SAGALINE_OUTBOX_ROUTES (e.g. "order.*=redis://localhost:6379/0") and the
worker's relay sends them; `sagaline outbox ls` shows those still waiting. This
needs a SQL store (the default SQLite file, PostgreSQL or MySQL).
"""

from __future__ import annotations

from typing import Any

import sagaline
from sagaline import Retry, Saga, StepResponse, saga_step

from . import services
from .app import app


@app.task(name="shop.validate_order")
def validate_order(order_id: str, amount: float, sku: str, quantity: int) -> dict[str, Any]:
    if amount <= 0 or quantity <= 0:
        raise StepResponse.permanent_failure(f"order {order_id}: nothing to charge or ship")
    return {"amount_cents": round(amount * 100)}


@app.task(name="shop.refund_payment")
def refund_payment(order_id: str, compensation_data: dict[str, Any]) -> None:
    services.refund(compensation_data["transaction_id"])
    with sagaline.step_transaction() as tx:
        tx.publish("order.refunded", {"order_id": order_id, **compensation_data}, key=order_id)


@saga_step(compensate="shop.refund_payment")
@app.task(name="shop.charge_payment")
def charge_payment(order_id: str, amount_cents: int) -> StepResponse:
    txn = services.charge(
        order_id, amount_cents, idempotency_key=sagaline.current_step().idempotency_key
    )
    with sagaline.step_transaction() as tx:
        tx.publish(
            "order.charged",
            {"order_id": order_id, "amount_cents": amount_cents, "transaction_id": txn},
            key=order_id,
        )
    return StepResponse(
        output={"transaction_id": txn},
        compensation_data={"transaction_id": txn, "amount_cents": amount_cents},
    )


@app.task(name="shop.release_inventory")
def release_inventory(compensation_data: dict[str, Any]) -> None:
    services.release(compensation_data["reservation"])


@saga_step(compensate=release_inventory)
@app.task(name="shop.reserve_inventory")
def reserve_inventory(order_id: str, sku: str, quantity: int) -> StepResponse:
    key = sagaline.current_step().idempotency_key
    try:
        services.reserve(order_id, sku, quantity, idempotency_key=key)
    except services.OutOfStock as exc:
        raise StepResponse.permanent_failure(str(exc)) from None
    return StepResponse(output={"reserved": quantity}, compensation_data={"reservation": key})


@app.task(name="shop.send_confirmation")
def send_confirmation(order_id: str, txn: str) -> None:
    services.send_mail(
        order_id,
        f"order {order_id} paid ({txn})",
        idempotency_key=sagaline.current_step().idempotency_key,
    )
    with sagaline.step_transaction() as tx:
        tx.publish("order.confirmed", {"order_id": order_id, "transaction_id": txn}, key=order_id)


order_saga = (
    Saga("order_saga")
    .add_step(validate_order, no_compensation=True)
    .add_step(charge_payment, retry=Retry(max_attempts=3, backoff=1.0), timeout=30)
    .add_step(reserve_inventory)
    .add_step(
        send_confirmation,
        no_compensation=True,
        input=lambda ctx: {"order_id": ctx["order_id"], "txn": ctx["transaction_id"]},
    )
)
