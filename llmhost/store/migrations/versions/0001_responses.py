"""The response store as llmhost 0.x created it (metadata.create_all): kept as
the first revision, so a store written before Alembic upgrades in place.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

from llmhost.store.responses import Document

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables = set(sa.inspect(op.get_bind()).get_table_names())
    if "llmhost_responses" not in tables:
        op.create_table(
            "llmhost_responses",
            sa.Column("id", sa.String(80), primary_key=True),
            sa.Column("owner", sa.String(64), nullable=True, index=True),
            sa.Column("created_at", sa.Float, nullable=False, index=True),
            sa.Column("body", Document, nullable=False))
    if "llmhost_response_items" not in tables:
        op.create_table(
            "llmhost_response_items",
            sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("response_id", sa.String(80),
                      sa.ForeignKey("llmhost_responses.id", ondelete="CASCADE"),
                      nullable=False, index=True),
            sa.Column("kind", sa.String(8), nullable=False),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("item_id", sa.String(80), nullable=False),
            sa.Column("data", Document, nullable=False))
    if "llmhost_schema_version" in tables:     # the pre-Alembic version table
        op.drop_table("llmhost_schema_version")


def downgrade() -> None:
    op.drop_table("llmhost_response_items")
    op.drop_table("llmhost_responses")
