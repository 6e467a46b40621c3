"""job usage: a result's prompt and cached tokens beside its completion tokens (a batch's usage is one SUM)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 23:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("cached_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("cached_tokens")
        batch_op.drop_column("prompt_tokens")
