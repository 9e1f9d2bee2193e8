"""Usage counts and token quotas (llmhost/store/usage.py) in the store's database.

Before this revision the usage store made its own tables with create_all on first
use; a database that has them already keeps them (same layout), so this
revision only records them. From here on `llmhost db upgrade` creates them on
PostgreSQL, and SQLite upgrades itself, as for stored responses.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables = set(sa.inspect(op.get_bind()).get_table_names())
    if "llmhost_usage" not in tables:
        op.create_table(
            "llmhost_usage",
            sa.Column("hour", sa.Float, primary_key=True),        # unix time, hour start
            sa.Column("key", sa.String(64), primary_key=True),     # key digest or ""
            sa.Column("model", sa.String(256), primary_key=True),
            sa.Column("endpoint", sa.String(64), primary_key=True),
            sa.Column("key_name", sa.String(128), nullable=True, index=True),
            *(sa.Column(name, sa.BigInteger, nullable=False) for name in (
                "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors")))
    if "llmhost_quota" not in tables:
        op.create_table(
            "llmhost_quota",
            sa.Column("subject", sa.String(200), primary_key=True),
            sa.Column("period", sa.String(16), primary_key=True),  # d:2026-12-03, m:2026-12
            sa.Column("tokens", sa.BigInteger, nullable=False))


def downgrade() -> None:
    op.drop_table("llmhost_quota")
    op.drop_table("llmhost_usage")
