"""What each GPU is promised, kept on its row: placement reads a few GPUs instead of every allocation;
indexes for the strategies' orders and for a worker's GPUs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.add_column(sa.Column("promised_vram", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("promised_compute", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("sessions", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("load", sa.Float(), nullable=False, server_default="0"))
    # the strategies' orders: compact-first the busiest first, low-load-first the idlest; uuid breaks ties
    op.create_index("ix_gpus_busiest", "gpus", [sa.text("load DESC"), "uuid"])
    op.create_index("ix_gpus_idlest", "gpus", ["load", "uuid"])
    op.create_index("ix_gpus_worker_name", "gpus", ["worker_name"])  # a heartbeat reads its worker's GPUs
    # the active allocations of the database, counted onto their GPUs (the tables as they are at this
    # revision, not the models of a later pool)
    gpus = sa.table("gpus", sa.column("uuid"), sa.column("memory"), sa.column("promised_vram"),
                    sa.column("promised_compute"), sa.column("sessions"), sa.column("load"))
    allocations = sa.table("allocations", sa.column("gpu_uuids"), sa.column("vram"), sa.column("compute"),
                           sa.column("status"))
    conn = op.get_bind()
    totals = {uuid: [memory, 0, 0, 0] for uuid, memory in conn.execute(sa.select(gpus.c.uuid, gpus.c.memory))}
    for uuids, vram, compute in conn.execute(sa.select(allocations.c.gpu_uuids, allocations.c.vram,
                                                       allocations.c.compute).where(allocations.c.status == "active")):
        for uuid in uuids.split(","):
            if uuid in totals:
                totals[uuid][1:] = [totals[uuid][1] + vram, totals[uuid][2] + compute, totals[uuid][3] + 1]
    if totals:
        conn.execute(gpus.update().where(gpus.c.uuid == sa.bindparam("gpu")).values(
            promised_vram=sa.bindparam("vram"), promised_compute=sa.bindparam("compute"),
            sessions=sa.bindparam("count"), load=sa.bindparam("gpu_load")),
            [{"gpu": u, "vram": v, "compute": c, "count": n, "gpu_load": max(v / m, c / 100)}
             for u, (m, v, c, n) in totals.items()])


def downgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.drop_index("ix_gpus_busiest")
        batch.drop_index("ix_gpus_idlest")
        batch.drop_index("ix_gpus_worker_name")
        for column in ("load", "sessions", "promised_compute", "promised_vram"):
            batch.drop_column(column)
