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
    # the active allocations of the database, counted onto their GPUs
    from hub_spawner.pool.allocations import recount
    recount(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.drop_index("ix_gpus_busiest")
        batch.drop_index("ix_gpus_idlest")
        batch.drop_index("ix_gpus_worker_name")
        for column in ("load", "sessions", "promised_compute", "promised_vram"):
            batch.drop_column(column)
