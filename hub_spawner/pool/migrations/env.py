"""Alembic's entry point: runs the revisions on the connection migrations.upgrade hands over (the
pool's own engine, so SQLite keeps its pragmas and write lock)."""
from alembic import context
from sqlalchemy import create_engine

from hub_spawner.pool.db import Base, engine_url

connection = context.config.attributes.get("connection")
if connection is None:
    # the alembic command line (writing a revision): a database given as -x db=URL
    url = context.get_x_argument(as_dictionary=True).get("db", "sqlite:///gpulab-pool.sqlite")
    connection = create_engine(engine_url(url)).connect()
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
