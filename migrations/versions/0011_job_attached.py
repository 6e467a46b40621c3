"""job attached: whether only clients connected to an api wait for it (not a submitted job, a batch line, a
background response), so an embedded api's start can give up what its killed predecessor's clients waited for

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 02:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("attached", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("attached")
