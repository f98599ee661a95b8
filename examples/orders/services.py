"""Fake payment, inventory and mail services, each writing its own table.

They live in EXAMPLE_DB_URL, else in the sagaline store's database. Every call
that creates something takes an idempotency key, as a real provider's API does.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from sagaline.config import default_store_url

metadata = sa.MetaData()

payments = sa.Table(
    "shop_payments",
    metadata,
    sa.Column("txn_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # charged | refunded
)
stock = sa.Table(
    "shop_stock",
    metadata,
    sa.Column("sku", sa.String(64), primary_key=True),
    sa.Column("available", sa.Integer, nullable=False),
)
reservations = sa.Table(
    "shop_reservations",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("sku", sa.String(64), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
)
emails = sa.Table(
    "shop_emails",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)

INITIAL_STOCK = {"widget": 100, "gadget": 25}

_engines: dict[tuple[str, int], Engine] = {}
_lock = threading.Lock()


def engine() -> Engine:
    url = (
        os.environ.get("EXAMPLE_DB_URL")
        or os.environ.get("SAGALINE_STORE_URL")
        or default_store_url()
    )
    key = (url, os.getpid())
    with _lock:
        if key not in _engines:
            _engines[key] = _create(url)
        return _engines[key]


def _create(url: str) -> Engine:
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(eng, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(eng, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # read-then-write: take the lock first
    else:
        eng = sa.create_engine(url, pool_pre_ping=True)
    with eng.begin() as conn:
        if eng.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(827175)"))
        metadata.create_all(conn)
        if conn.execute(sa.select(sa.func.count()).select_from(stock)).scalar_one() == 0:
            conn.execute(
                stock.insert(), [{"sku": k, "available": v} for k, v in INITIAL_STOCK.items()]
            )
    return eng


class OutOfStock(Exception):
    pass


def charge(order_id: str, amount_cents: int, *, idempotency_key: str) -> str:
    with engine().begin() as conn:
        txn = conn.execute(
            sa.select(payments.c.txn_id).where(payments.c.key == idempotency_key)
        ).scalar()
        if txn is None:
            txn = str(uuid.uuid4())
            conn.execute(
                payments.insert().values(
                    txn_id=txn,
                    key=idempotency_key,
                    order_id=order_id,
                    amount_cents=amount_cents,
                    status="charged",
                )
            )
        return str(txn)


def refund(txn_id: str) -> None:
    with engine().begin() as conn:
        conn.execute(payments.update().where(payments.c.txn_id == txn_id).values(status="refunded"))


def reserve(order_id: str, sku: str, quantity: int, *, idempotency_key: str) -> None:
    with engine().begin() as conn:
        if conn.execute(
            sa.select(reservations.c.key).where(reservations.c.key == idempotency_key)
        ).first():
            return
        taken = conn.execute(
            stock.update()
            .where(stock.c.sku == sku, stock.c.available >= quantity)
            .values(available=stock.c.available - quantity)
        ).rowcount
        if taken != 1:
            raise OutOfStock(f"{quantity} x {sku} not in stock")
        conn.execute(
            reservations.insert().values(
                key=idempotency_key, order_id=order_id, sku=sku, quantity=quantity
            )
        )


def release(idempotency_key: str) -> None:
    with engine().begin() as conn:
        row = (
            conn.execute(sa.select(reservations).where(reservations.c.key == idempotency_key))
            .mappings()
            .first()
        )
        if row is None:
            return  # already released
        conn.execute(
            stock.update()
            .where(stock.c.sku == row["sku"])
            .values(available=stock.c.available + row["quantity"])
        )
        conn.execute(reservations.delete().where(reservations.c.key == idempotency_key))


def send_mail(order_id: str, body: str, *, idempotency_key: str) -> None:
    with engine().begin() as conn:
        if not conn.execute(sa.select(emails.c.key).where(emails.c.key == idempotency_key)).first():
            conn.execute(emails.insert().values(key=idempotency_key, order_id=order_id, body=body))
