"""job attempts, last send and waiters

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 05:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("sent_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("waiters", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_jobs_finished_at", ["finished_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_finished_at")
        batch_op.drop_column("waiters")
        batch_op.drop_column("sent_at")
        batch_op.drop_column("attempts")
