"""Native mode: the path of each worker's Unix socket, which the pool hands the servers of local vGPUs on
that worker's node (their native libcuda.so.1 reaches the worker there).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "" until the worker registers again: its vGPUs are forwarded meanwhile, as before
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("unix_socket", sa.String(255), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("unix_socket")
