"""The SQL store's schema lifecycle: which revision a database holds, and bringing it
to the head revision with Alembic (the migrations are in migrations/), safely when many
workers start at once."""

from __future__ import annotations

import contextlib
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import schema


def current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table(schema.VERSION_TABLE):
        return None
    row = conn.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).first()
    return None if row is None else str(row[0])


def has_schema(engine: Engine) -> bool:
    """Whether the database holds sagaline's schema, at any revision."""
    with engine.connect() as conn:
        return current_revision(conn) is not None


def migrate(engine: Engine, writer: Engine, dialect: str, sqlite_path: Path | None) -> None:
    """Create or upgrade the schema; `writer` runs write transactions on `engine`'s pool."""
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    with engine.connect() as conn:
        if current_revision(conn) == schema.SCHEMA_REVISION:
            conn.rollback()
            return
        conn.rollback()
    # Imported only when there is something to migrate: it costs ~10 MB per process.
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    # Many workers may start at once: one migrates, the others wait and find it done.
    # MySQL's named lock belongs to a session, not a transaction: it is taken on a
    # connection of its own and released only after the migration has committed,
    # or a waiter would find the tables (DDL commits at once) without the revision.
    with contextlib.ExitStack() as stack:
        if dialect == "mysql":
            lock_conn = stack.enter_context(engine.connect())
            lock_conn.execute(sa.text("SELECT GET_LOCK('sagaline_migrate', 120)"))
            stack.callback(lock_conn.execute, sa.text("SELECT RELEASE_LOCK('sagaline_migrate')"))
        with writer.begin() as conn:
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7366551)"))
            if current_revision(conn) != schema.SCHEMA_REVISION:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
