"""Two replicas and Kubernetes: the leader's lease, and the pod each worker runs in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.Column("acquired", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("pod", sa.String(253), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("pod")
    op.drop_table("leases")
