"""jobs API and batches: idempotency keys, files, batches, batch lines; a job's batch

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 05:15:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("completion_tokens", sa.Integer(), nullable=True))
        batch_op.create_index("ix_jobs_batch_id", ["batch_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(length=255), primary_key=True),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_files_created_at", "files", ["created_at"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        *[
            sa.Column(f"{name}_at", sa.Float(), nullable=True)
            for name in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        ],
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_index("ix_batches_created_at", "batches", ["created_at"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(length=64), primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(length=512), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
    )
    op.create_index("ix_batch_lines_job_id", "batch_lines", ["job_id"])


def downgrade() -> None:
    op.drop_table("batch_lines")
    op.drop_table("batches")
    op.drop_table("files")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_batch_id")
        batch_op.drop_column("completion_tokens")
        batch_op.drop_column("batch_id")
