"""The schema of the last pool before revisions: workers, their GPUs and allocations.

A database made by that pool is stamped with this revision after db.bring_to_first_revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("control_url", sa.String(255), nullable=False),
    )
    op.create_table(
        "gpus",
        sa.Column("uuid", sa.String(128), primary_key=True),
        sa.Column("worker_name", sa.String(255), sa.ForeignKey("workers.name"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("memory", sa.BigInteger(), nullable=False),
        sa.Column("capability", sa.String(16), nullable=False),
        sa.Column("emulated", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("server_name", sa.String(255), nullable=False),
        sa.Column("profile", sa.String(255), nullable=False),
        sa.Column("worker_name", sa.String(255), nullable=False),
        sa.Column("gpu_uuids", sa.String(2048), nullable=False),
        sa.Column("vram", sa.BigInteger(), nullable=False),
        sa.Column("compute", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("qos", sa.String(16), nullable=False),
        sa.Column("burst", sa.Boolean(), nullable=False),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("used_vram", sa.BigInteger(), nullable=False),
        sa.Column("overhead_vram", sa.BigInteger(), nullable=False),
        sa.Column("kernel_seconds", sa.Float(), nullable=False),
        sa.Column("kernel_time_seen", sa.Float(), nullable=False),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("ended", sa.Float(), nullable=True),
    )
    for column in ("user", "worker_name", "status"):
        op.create_index(f"ix_allocations_{column}", "allocations", [column])


def downgrade() -> None:
    op.drop_table("allocations")
    op.drop_table("gpus")
    op.drop_table("workers")
