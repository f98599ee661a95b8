"""Stores for tests, one per test, isolated and cleaned: `--sagaline-store=`.

memory (default, no I/O), sqlite (a file in the test's tmp dir), postgresql://...
(a database of its own, created and dropped), redis://... (a key prefix of its
own, deleted). Only a real store URL makes any network connection.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..stores.base import Store
from ..stores.registry import store_from_url


@contextlib.contextmanager
def isolated_store(kind: str, value: str, tmp_dir: Path) -> Iterator[Store]:
    """A store of `kind` (memory, sqlite, postgresql, redis; `value` is the URL of the
    server), used by one test only, cleaned afterwards."""
    tag = uuid.uuid4().hex[:12]  # names this test's database or key prefix
    if kind == "memory":
        from ..stores.memory import MemoryStore

        yield MemoryStore()
        return
    if kind == "sqlite":
        path = tmp_dir / f"sagaline-{tag}.db"
        store = store_from_url(f"sqlite:///{path}")
        try:
            yield store
        finally:
            store.close()
            for leftover in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                leftover.unlink(missing_ok=True)
        return
    if kind == "redis":
        store = store_from_url(value, prefix=f"sagaline-plugin-{tag}")
        try:
            yield store
        finally:
            _delete_prefix(store, f"sagaline-plugin-{tag}")
            store.close()
        return
    with _postgres_database(value, f"sagaline_plugin_{tag}") as url:
        store = store_from_url(url)
        try:
            yield store
        finally:
            store.close()


def _delete_prefix(store: Store, prefix: str) -> None:
    client = store._client  # type: ignore[attr-defined]
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


@contextlib.contextmanager
def _postgres_database(url: str, name: str) -> Iterator[str]:
    """A database of its own on the server of `url`, dropped afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    base = make_url(
        url
        if "+" in url.split(":", 1)[0]
        else url.replace("postgresql:", "postgresql+psycopg:", 1).replace(
            "postgres:", "postgresql+psycopg:", 1
        )
    )
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
