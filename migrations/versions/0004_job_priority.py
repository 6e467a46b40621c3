"""job priority and stream

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.String(length=16), server_default="interactive", nullable=False))
        batch_op.add_column(sa.Column("stream", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("stream")
        batch_op.drop_column("priority")
