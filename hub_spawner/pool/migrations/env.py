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
# SQLite's DDL is transactional too (Alembic assumes not): all revisions in one transaction under its
# write lock, so that a second pool starting at the same moment never sees half a schema
context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
