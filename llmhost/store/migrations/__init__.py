"""Alembic migrations of the response store (run by llmhost.store.responses.upgrade:
`llmhost db upgrade`, or by SQLite on first use)."""
