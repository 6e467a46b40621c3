"""API keys; owners of jobs, files and batches; response-cache namespaces

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(length=64), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("namespace", sa.String(length=64), server_default="", nullable=False))
        batch_op.create_index("ix_jobs_owner", ["owner"])
    for table in ("files", "batches"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
            batch_op.create_index(f"ix_{table}_owner", ["owner"])
    with op.batch_alter_table("cache_entries") as batch_op:
        batch_op.add_column(sa.Column("namespace", sa.String(length=64), server_default="", nullable=False))
        batch_op.create_index("ix_cache_entries_namespace", ["namespace"])


def downgrade() -> None:
    with op.batch_alter_table("cache_entries") as batch_op:
        batch_op.drop_index("ix_cache_entries_namespace")
        batch_op.drop_column("namespace")
    for table in ("batches", "files"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_index(f"ix_{table}_owner")
            batch_op.drop_column("owner")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_owner")
        batch_op.drop_column("namespace")
        batch_op.drop_column("owner")
    op.drop_table("api_keys")
