"""job routes: the worker a job was sent to, why, and its session

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 05:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("target", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("route_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("route_matched", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("session", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_jobs_target", ["target"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_target")
        batch_op.drop_column("session")
        batch_op.drop_column("route_matched")
        batch_op.drop_column("route_reason")
        batch_op.drop_column("target")
