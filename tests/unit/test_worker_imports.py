"""A worker loads only what running steps needs: not the CLI's, the web UI's or the
migrations' libraries, and on the Redis store not SQLAlchemy (its memory is
compared with a plain Celery worker's: bench/figures.py, MEM)."""

from __future__ import annotations

import subprocess
import sys

EVERYWHERE = ("typer", "rich", "alembic", "fastapi", "jinja2", "uvicorn", "prometheus_client")

WORKER = """
import sys
from celery import Celery
import sagaline
from sagaline import Saga

app = Celery("w", broker="memory://")
runtime = sagaline.init_app(app, store={store!r}, sweeper=False)


@app.task(name="imports.a")
def step_a(saga_id):
    return None


saga = Saga("imports.s").add_step(step_a, name="a")
runtime.store  # the store object, as a worker holds it
import sagaline.execution, sagaline.acking, sagaline.delivery, sagaline.outbox.step
absent = {absent!r}
loaded = [m for m in absent if m in sys.modules]
assert not loaded, loaded
print("ok")
"""


def run_worker_imports(store: str, absent: tuple[str, ...]) -> str:
    code = WORKER.format(store=store, absent=absent)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_redis_store_worker_never_imports_sqlalchemy_nor_the_cli_web_or_migrations() -> None:
    out = run_worker_imports("redis://127.0.0.1:1/0", ("sqlalchemy", *EVERYWHERE))
    assert out.strip() == "ok"


def test_a_sqlite_store_worker_never_imports_the_cli_web_or_migrations_libraries(
    tmp_path: object,
) -> None:
    out = run_worker_imports(
        f"sqlite:///{tmp_path}/imports.db", (*EVERYWHERE, "sqlalchemy.dialects.mysql")
    )
    assert out.strip() == "ok"


def test_the_mysql_tables_still_say_utf8mb4_bin_when_their_ddl_is_made() -> None:
    # The schema no longer names MySQL's options (that loaded the MySQL dialect in
    # every worker): creating the tables on MySQL adds them.
    code = """
import sqlalchemy as sa
from sagaline.stores import schema
ddl = []
engine = sa.create_mock_engine(
    "mysql+pymysql://", lambda sql, *a, **k: ddl.append(str(sql.compile(dialect=engine.dialect)))
)
schema.metadata.create_all(engine)
for table in schema.MYSQL_BINARY_TABLES:
    create = next(d for d in ddl if d.strip().startswith(f"CREATE TABLE {table.name} "))
    assert "CHARSET=utf8mb4" in create and "COLLATE utf8mb4_bin" in create, create
print(len(schema.MYSQL_BINARY_TABLES))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "5"
