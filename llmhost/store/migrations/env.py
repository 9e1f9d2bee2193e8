"""Alembic environment: always called with a live connection
(llmhost.store.responses.upgrade), which holds the migration lock."""
from alembic import context

from llmhost.store.responses import VERSION_TABLE

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters tables by copying them (Alembic's batch mode).
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
