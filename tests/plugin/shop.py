"""A small shop, written as a user would: the sagas the plugin's tests run."""

from __future__ import annotations

from typing import Any

from celery import Celery

import sagaline
from sagaline import Retry, Saga, StepResponse, saga_step

app = Celery("plugin_shop", broker="memory://", set_as_current=False)
sagaline.init_app(app, store="memory://", sweeper=False)

# The systems the saga changes: a balance, a stock and the shipments made.
WORLD: dict[str, Any] = {}


def reset_world() -> None:
    WORLD.clear()
    WORLD.update(balance=100, stock=5, shipments=[], charges={})


reset_world()


@app.task(name="shop.refund")
def refund(compensation_data: dict[str, Any]) -> None:
    # Idempotent: a refund is keyed by the charge it undoes.
    if WORLD["charges"].pop(compensation_data["charge"], None) is not None:
        WORLD["balance"] += compensation_data["amount"]


@saga_step(compensate=refund)
@app.task(name="shop.charge")
def charge(amount: int, saga_id: str) -> StepResponse:
    key = sagaline.current_step().idempotency_key
    if key not in WORLD["charges"]:
        WORLD["charges"][key] = amount
        WORLD["balance"] -= amount
    return StepResponse(output={"charge": key}, compensation_data={"charge": key, "amount": amount})


@app.task(name="shop.release")
def release(compensation_data: dict[str, Any]) -> None:
    # The seeded bug: not idempotent; run twice, it puts the stock back twice.
    WORLD["stock"] += compensation_data["reserved"]


@app.task(name="shop.release_once")
def release_once(saga_id: str, qty: int) -> None:
    # Idempotent: the reservation is remembered per saga.
    if WORLD.pop(f"reserved:{saga_id}", None):
        WORLD["stock"] += qty


@saga_step(compensate=release_once)
@app.task(name="shop.reserve")
def reserve(qty: int, saga_id: str) -> dict[str, Any]:
    if not WORLD.get(f"reserved:{saga_id}"):
        WORLD[f"reserved:{saga_id}"] = True
        WORLD["stock"] -= qty
    return {"reserved": qty}


@app.task(name="shop.ship")
def ship(saga_id: str, reserved: int) -> dict[str, Any]:
    if saga_id not in WORLD["shipments"]:
        WORLD["shipments"].append(saga_id)
    return {"shipped": True}


order = Saga("plugin_order").add_step(charge).add_step(reserve).add_step(ship, no_compensation=True)


# The same order with a compensation that is not idempotent (explore_failures finds it).
buggy_order = (
    Saga("plugin_order_buggy")
    .add_step(charge)
    .add_step(reserve, compensate=release)
    .add_step(ship, no_compensation=True)
)


def world() -> dict[str, Any]:
    """What explore_failures compares: the shop's systems, without per-saga keys."""
    return {
        "balance": WORLD["balance"],
        "stock": WORLD["stock"],
        "shipments": len(WORLD["shipments"]),
        "charges": len(WORLD["charges"]),
    }


# -- a long saga: 10 steps, each retried with 1-hour backoffs, under a 1-day deadline --

ATTEMPTS: dict[str, int] = {}


@app.task(name="shop.slow_step")
def slow_step(n: int = 0, **ctx: Any) -> dict[str, Any]:
    step = sagaline.current_step()
    ATTEMPTS[step.step] = step.attempt
    if step.attempt < 2:  # every step fails once, then succeeds an hour later
        raise ConnectionError(f"{step.step}: supplier unreachable")
    return {f"done_{step.step}": True}


@app.task(name="shop.undo_slow_step")
def undo_slow_step(**ctx: Any) -> None:
    return None


HOURLY = Retry(max_attempts=3, backoff=3600.0, factor=1.0, max_delay=3600.0, jitter=0.0)
long_saga = Saga("plugin_long", timeout=86400)
for i in range(10):
    long_saga.add_step(slow_step, name=f"s{i}", compensate=undo_slow_step, retry=HOURLY)


# -- a parent saga that runs a child saga as one of its steps --


@app.task(name="shop.pack")
def pack(saga_id: str, qty: int) -> dict[str, Any]:
    WORLD["packed"] = WORLD.get("packed", 0) + qty
    return {"packed": qty}


@app.task(name="shop.unpack")
def unpack(compensation_data: dict[str, Any]) -> None:
    WORLD["packed"] -= compensation_data["packed"]


@app.task(name="shop.notify")
def notify(saga_id: str) -> None:
    return None


packing = Saga("plugin_packing").add_step(pack, compensate=unpack)
fulfilment = (
    Saga("plugin_fulfilment")
    .add_step(charge)
    .add_saga(packing, name="packing")
    .add_step(notify, no_compensation=True)
)
