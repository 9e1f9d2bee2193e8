"""Leases: which server generates an in_progress response, until when
(a response whose replica died reads as failed once its lease passed).

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("llmhost_responses") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("server_id", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.Float, nullable=True))
        batch.create_index("ix_llmhost_responses_server_id", ["server_id"])


def downgrade() -> None:
    with op.batch_alter_table("llmhost_responses") as batch:
        batch.drop_index("ix_llmhost_responses_server_id")
        batch.drop_column("lease_until")
        batch.drop_column("server_id")
        batch.drop_column("status")
