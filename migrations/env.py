"""Alembic environment for the catalog, driven only by `clipsearch.migrate` (there is no alembic.ini).

The catalog passes its open connection in `config.attributes["connection"]`, already inside a
transaction, so Alembic neither begins nor commits: an upgrade is applied whole or not at all.
"""

from alembic import context

from clipsearch.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with a connection in config.attributes, as clipsearch.migrate does")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
