"""A Celery app whose steps write business rows and events with sagaline.step_transaction.

The business tables live in the saga store's database (SAGALINE_STORE_URL). A step
told to crash kills its own process (SIGKILL) once, before or right after its
transaction commits; a marker file (in CRASH_DIR) makes the crash happen once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery

import sagaline
from sagaline import Saga, StepFailure, saga_step
from sagaline.outbox import step as step_tx

app = Celery("outbox_app", broker=os.environ.get("CELERY_BROKER_URL") or None)
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1)
sagaline.init_app(app, sweep_interval=float(os.environ.get("SAGALINE_SWEEP_INTERVAL", "1")))

metadata = sa.MetaData()
payments = sa.Table(
    "biz_payments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
)
refunds = sa.Table(
    "biz_refunds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.String(64), nullable=False),
)


def _crash_once(order_id: str, when: str) -> bool:
    """True the first time this order asks to crash at `when` (the marker stays)."""
    marker = Path(os.environ["CRASH_DIR"]) / f"{order_id}.{when}"
    if marker.exists():
        return False
    marker.touch()
    return True


_kill_after_commit: set[str] = set()


def _kill_if_asked(runtime: Any, event_ids: list[str]) -> None:
    # Right after the commit, before the successors' messages are published.
    if any(e.split(":")[0] in _kill_after_commit for e in event_ids):
        os.kill(os.getpid(), signal.SIGKILL)


step_tx.committed_hooks.append(_kill_if_asked)


@app.task(name="ob.refund")
def refund(order_id: str, **_: Any) -> None:
    with sagaline.step_transaction() as tx:
        tx.connection.execute(refunds.insert().values(order_id=order_id))
        tx.publish("order.refunded", {"order_id": order_id}, key=order_id)


@saga_step(compensate=refund)
@app.task(name="ob.debit")
def debit(
    order_id: str, amount: int, crash: str = "", fail_inside: bool = False, **_: Any
) -> dict[str, Any]:
    with sagaline.step_transaction() as tx:
        tx.execute(payments.insert().values(order_id=order_id, amount=amount))
        tx.publish("order.debited", {"order_id": order_id, "amount": amount}, key=order_id)
        tx.publish("order.audit", {"order_id": order_id})
        if fail_inside:
            raise StepFailure("card declined after the write")
        if crash == "before_commit" and _crash_once(order_id, crash):
            os.kill(os.getpid(), signal.SIGKILL)
        if crash == "after_commit" and _crash_once(order_id, crash):
            _kill_after_commit.add(sagaline.current_step().saga_id)
        return {"debited": amount}


@app.task(name="ob.ship")
def ship(order_id: str, fail_ship: bool = False, **_: Any) -> dict[str, Any]:
    if fail_ship:
        raise StepFailure("no courier")
    return {"shipped": order_id}


pay = Saga("outbox_pay").add_step(debit).add_step(ship, no_compensation=True)


# PostgreSQL only: a unique constraint checked at COMMIT, so the step's transaction
# fails after its body returned.
DEFERRED_DDL = """
CREATE TABLE IF NOT EXISTS biz_deferred (
    order_id text,
    CONSTRAINT biz_deferred_once UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED
)"""


@app.task(name="ob.deferred")
def deferred(order_id: str, **_: Any) -> dict[str, Any]:
    with sagaline.step_transaction() as tx:
        tx.execute(sa.text("INSERT INTO biz_deferred VALUES (:o), (:o)"), {"o": order_id})
        tx.publish("order.deferred", {"order_id": order_id}, key=order_id)
    return {"never": True}


commit_fails = Saga("outbox_commit_fails").add_step(
    deferred, no_compensation=True, retry=sagaline.Retry(max_attempts=2, backoff=0.1)
)
