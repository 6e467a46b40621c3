"""job endpoint: the path its client called, since a chat job's kind is the same from every dialect (its listing
said /v1/chat/completions for a /v1/messages or /v1/responses job)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-20 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("endpoint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("endpoint")
