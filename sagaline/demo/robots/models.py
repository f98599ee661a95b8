"""The robot fleet's own tables (robots, routes, missions, maps), in SQLAlchemy Core.

They live in EXAMPLE_DB_URL, else in the sagaline store's database
(SAGALINE_STORE_URL, else the embedded SQLite file): the example needs no
server of its own. Tables are created, and the fleet seeded, on first use.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from sagaline.config import default_store_url

FLEET_SIZE = 24

metadata = sa.MetaData()

robots = sa.Table(
    "robots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default="idle"),  # idle | allocated
    sa.Column("assigned_saga", sa.String(64), nullable=True, index=True),
)

routes = sa.Table(
    "routes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # sagaline.current_step().idempotency_key: a redelivered step finds its own row.
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("saga_id", sa.String(64), nullable=False, index=True),
    sa.Column("area", sa.String(64), nullable=False),
    sa.Column("waypoints", sa.JSON, nullable=False),
)

missions = sa.Table(
    "missions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("saga_id", sa.String(64), nullable=False, index=True),
    sa.Column("area", sa.String(64), nullable=False),
    # explored -> completed (maps integrated) | aborted (compensated)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("cells", sa.Integer, nullable=False),
)

maps = sa.Table(
    "maps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("saga_id", sa.String(64), nullable=False, index=True),
    sa.Column("area", sa.String(64), nullable=False, index=True),
    # One row per version of an area's map: the current map is the highest version,
    # so deleting a version restores the previous map exactly.
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("cells", sa.Integer, nullable=False),
)


def database_url() -> str:
    return (
        os.environ.get("EXAMPLE_DB_URL")
        or os.environ.get("SAGALINE_STORE_URL")
        or default_store_url()
    )


_engines: dict[tuple[str, int], Engine] = {}
_lock = threading.Lock()


def engine() -> Engine:
    """This process's engine for `database_url()`, with the tables created on first use."""
    url = database_url()
    key = (url, os.getpid())  # a forked pool child opens its own connections
    with _lock:
        if key not in _engines:
            _engines[key] = _create_engine(url)
        return _engines[key]


def _create_engine(url: str) -> Engine:
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _serialize_sqlite_writes(eng)
    else:
        eng = sa.create_engine(url, pool_pre_ping=True)
    with eng.begin() as conn:
        if eng.dialect.name == "postgresql":
            # Pool processes start together: one creates the tables, the others wait.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(827174)"))
        metadata.create_all(conn)
        if conn.execute(sa.select(sa.func.count()).select_from(robots)).scalar_one() == 0:
            conn.execute(
                robots.insert(),
                [
                    {"id": i, "name": f"rover-{i:02d}", "status": "idle", "assigned_saga": None}
                    for i in range(1, FLEET_SIZE + 1)
                ],
            )
    return eng


def _serialize_sqlite_writes(eng: Engine) -> None:
    # Steps read then write: a deferred SQLite transaction could fail to upgrade its
    # lock after another process committed, so every transaction takes the write lock.
    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(eng, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def fleet() -> dict[str, int]:
    """How many robots are in each status."""
    with engine().connect() as conn:
        rows = conn.execute(
            sa.select(robots.c.status, sa.func.count()).group_by(robots.c.status)
        ).all()
    return {str(status): int(n) for status, n in rows}


def robots_held_by(saga_ids: list[str]) -> list[dict[str, Any]]:
    """Robots still assigned to any of these sagas."""
    if not saga_ids:
        return []
    with engine().connect() as conn:
        rows = (
            conn.execute(
                sa.select(robots).where(robots.c.assigned_saga.in_(saga_ids)).order_by(robots.c.id)
            )
            .mappings()
            .all()
        )
    return [dict(r) for r in rows]
