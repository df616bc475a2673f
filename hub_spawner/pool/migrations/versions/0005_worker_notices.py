"""PostgreSQL: a notice on channel gpulab_workers whenever what a worker's heartbeats are answered may have
changed (its version, status or credential; a worker added or removed), so that replicas answer the usual
heartbeat from what they know without reading the worker's row first (hub_spawner/pool/changes.py).
Nothing on SQLite, whose pool reads the row.

The notice is "<name> <version>": the version when only the version moved and the worker is up (a replica
that made the move itself knows it already), -1 otherwise (whatever was known of the worker is old).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION gpulab_worker_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('gpulab_workers', OLD.name || ' -1');
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.version = OLD.version AND NEW.status = OLD.status
            AND NEW.credential_hash IS NOT DISTINCT FROM OLD.credential_hash THEN
        RETURN NEW;  -- last_seen, an address: no heartbeat's answer changes
    END IF;
    PERFORM pg_notify('gpulab_workers', NEW.name || ' ' || CASE
        WHEN TG_OP = 'UPDATE' AND NEW.status = 'up' AND OLD.status = 'up'
             AND NEW.credential_hash IS NOT DISTINCT FROM OLD.credential_hash THEN NEW.version
        ELSE -1 END);
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute("CREATE TRIGGER workers_moved AFTER INSERT OR UPDATE OR DELETE ON workers "
               "FOR EACH ROW EXECUTE FUNCTION gpulab_worker_moved()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS workers_moved ON workers")
    op.execute("DROP FUNCTION IF EXISTS gpulab_worker_moved()")
