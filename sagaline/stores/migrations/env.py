"""Alembic environment for sagaline's schema; run through `SQLStore.migrate()`."""

from __future__ import annotations

from alembic import context

from sagaline.stores.schema import VERSION_TABLE, add_mysql_table_options, metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through SQLStore.migrate()
    raise RuntimeError("run sagaline migrations with `sagaline db upgrade`")
if connection.dialect.name == "mysql":
    add_mysql_table_options()  # what autogenerate compares and renders

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
