"""The pool database's schema revisions (Alembic), applied by every pool at start.

``upgrade(engine)`` brings any database to the newest revision: an empty one is created by the
revisions, one made before the pool used Alembic is first brought to revision 0001 in place
(db.bring_to_first_revision), then upgraded.  Replicas starting together take turns: on PostgreSQL
behind an advisory lock, on SQLite behind its write lock.  The revisions live in versions/; a new
one is written with ``alembic -c hub_spawner/pool/migrations/alembic.ini revision -m "..."``.
"""
from __future__ import annotations

import logging
import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import inspect

log = logging.getLogger("gpulab.pool")
# Alembic narrates every step at INFO; the pool says in one line what changed (upgrade)
logging.getLogger("alembic").setLevel(logging.WARNING)

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST = "0001"
# pg_advisory_lock key of the upgrade: any 64-bit number no other program on the database uses
UPGRADE_LOCK = 0x6770756C6162  # "gpulab"


def config(connection=None) -> Config:
    """Alembic's configuration without an ini file: where the revisions are, and the connection to use."""
    cfg = Config()
    cfg.set_main_option("script_location", HERE)
    cfg.attributes["connection"] = connection
    return cfg


def current(connection) -> str | None:
    """The database's revision (None: none yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def head() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(config()).get_current_head()


def upgrade(engine) -> None:
    """Bring the database to the newest revision, whatever it holds now."""
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({UPGRADE_LOCK})")
            conn.commit()
        try:
            _upgrade(engine, conn)
        except CommandError as exc:
            raise CommandError(f"{exc} (the database's schema is newer than this pool's, {head()}: run the newer "
                               "pool)" if "Can't locate revision" in str(exc) else str(exc)) from None
        finally:
            if postgres:
                conn.rollback()  # a failed upgrade leaves the transaction aborted: the unlock needs a new one
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({UPGRADE_LOCK})")
                conn.commit()


def _upgrade(engine, conn) -> None:
    from ..db import bring_to_first_revision
    tables = set(inspect(conn).get_table_names())
    conn.commit()
    before = current(conn)
    conn.commit()
    if before is None and "workers" in tables:
        log.info("the pool database predates schema revisions: bringing it to revision %s in place", FIRST)
        bring_to_first_revision(engine)
        command.stamp(config(conn), FIRST)
        conn.commit()
        before = FIRST
    command.upgrade(config(conn), "head")
    conn.commit()
    after = current(conn)
    conn.commit()
    if after != before:
        log.info("the pool database was upgraded from revision %s to %s", before or "(empty)", after)
