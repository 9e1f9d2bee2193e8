"""Stored responses: the Responses API's `store` (on by default, as OpenAI),
`previous_response_id`, and the retrieve / delete / input_items routes.

SQLAlchemy (2.x ORM) because it is the well-kept way to speak to SQLite (the
default: one file under LLMHOST_STATE_DIR, no service to run) and to
PostgreSQL or MySQL through LLMHOST_DATABASE_URL, so replicas can share one
store; it writes every statement and creates the schema itself
(``metadata.create_all``). The schema version is kept in a table of its own,
so a later llmhost can tell which layout it finds and migrate it.

Each response keeps its full context (the items of the responses it continued
and its own input) as its input items, and its output items: continuing a
response never needs another row, so deleting or expiring an earlier turn
never breaks a later one.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from flask import current_app
from sqlalchemy import JSON, Float, ForeignKey, Integer, String, create_engine, delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..config import settings
from ..engine.errors import InvalidInput, ServerFailure

log = logging.getLogger("llmhost")

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "llmhost_schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class StoredResponse(Base):
    __tablename__ = "llmhost_responses"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    # SHA-256 of the API key that created it (None when the server has no keys).
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    body: Mapped[dict] = mapped_column(JSON)


class StoredItem(Base):
    __tablename__ = "llmhost_response_items"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(
        String(80), ForeignKey("llmhost_responses.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))          # "input" or "output"
    position: Mapped[int] = mapped_column(Integer)
    item_id: Mapped[str] = mapped_column(String(80))
    data: Mapped[dict] = mapped_column(JSON)


def default_url(state_dir: str) -> str:
    if not state_dir:
        # platformdirs: the per-user data folder each OS expects
        # (~/.local/share/llmhost on Linux), rather than guessing paths here.
        import platformdirs
        state_dir = platformdirs.user_data_dir("llmhost", appauthor=False)
    return "sqlite:///" + os.path.join(os.path.abspath(state_dir), "llmhost.db")


class StoreError(ServerFailure):
    """The store could not be read or written: a 500 that says so. The failed
    transaction is rolled back, so nothing stored before is touched."""

    def __init__(self, action: str, exc: BaseException) -> None:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        super().__init__(f"The response store could not {action} ({reason}). Responses "
                         "stored before are unaffected; check LLMHOST_DATABASE_URL / "
                         "LLMHOST_STATE_DIR, or send `store: false`.", code="store_unavailable")


class Store:
    """Thread-safe: every call uses its own session (and connection from the
    engine's pool); SQLite writers wait for each other (busy timeout) instead
    of failing."""

    def __init__(self, url: str, ttl: float = 0.0) -> None:
        self.url = url
        self.ttl = ttl
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            connect_args["timeout"] = 60          # seconds a writer waits for the lock
            db = parsed.database or ""
            if db and db != ":memory:" and not db.startswith("file:"):
                os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            found = session.scalar(select(SchemaVersion.version))
            if found is None:
                session.add(SchemaVersion(version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise RuntimeError(f"The response store at {parsed.render_as_string()} has schema "
                                   f"version {found}, written by a newer llmhost (this one knows "
                                   f"{SCHEMA_VERSION}).")

    # -- writes -------------------------------------------------------------------

    def create(self, body: dict, owner: str | None, input_items: list[dict]) -> None:
        """Store a new response (usually in_progress) with its input items; old
        responses past LLMHOST_RESPONSES_TTL go in the same transaction."""
        try:
            with Session(self.engine) as session, session.begin():
                self._expire(session)
                session.add(StoredResponse(id=body["id"], owner=owner,
                                           created_at=float(body["created_at"]), body=body))
                session.add_all(StoredItem(response_id=body["id"], kind="input", position=i,
                                           item_id=item["id"], data=item)
                                for i, item in enumerate(input_items))
        except SQLAlchemyError as exc:
            log.error("storing response %s failed: %s", body["id"], exc)
            raise StoreError("store this response", exc) from exc

    def finish(self, body: dict) -> None:
        """The final body of a stored response, and its output items."""
        try:
            with Session(self.engine) as session, session.begin():
                row = session.get(StoredResponse, body["id"])
                if row is None:        # deleted (or expired) while it was generated
                    return
                row.body = body
                session.add_all(StoredItem(response_id=body["id"], kind="output", position=i,
                                           item_id=item["id"], data=item)
                                for i, item in enumerate(body["output"]))
        except SQLAlchemyError as exc:
            log.error("storing the output of response %s failed: %s", body["id"], exc)
            raise StoreError("store this response", exc) from exc

    def delete(self, response_id: str, owner: str | None, admin: bool) -> bool:
        try:
            with Session(self.engine) as session, session.begin():
                if self._find(session, response_id, owner, admin) is None:
                    return False
                session.execute(delete(StoredItem).where(StoredItem.response_id == response_id))
                session.execute(delete(StoredResponse).where(StoredResponse.id == response_id))
                return True
        except SQLAlchemyError as exc:
            raise StoreError("delete this response", exc) from exc

    def _expire(self, session: Session) -> None:
        if not self.ttl:
            return
        old = select(StoredResponse.id).where(StoredResponse.created_at < time.time() - self.ttl)
        # Items first: SQLite enforces no foreign keys unless told to.
        session.execute(delete(StoredItem).where(StoredItem.response_id.in_(old)))
        session.execute(delete(StoredResponse).where(StoredResponse.created_at
                                                     < time.time() - self.ttl))

    # -- reads --------------------------------------------------------------------

    def _find(self, session: Session, response_id: str, owner: str | None,
              admin: bool) -> StoredResponse | None:
        query = select(StoredResponse).where(StoredResponse.id == response_id)
        if not admin:            # keys are set and this one is no admin key: its own only
            query = query.where(StoredResponse.owner == owner)
        if self.ttl:
            query = query.where(StoredResponse.created_at >= time.time() - self.ttl)
        return session.scalar(query)

    def get(self, response_id: str, owner: str | None, admin: bool) -> dict | None:
        try:
            with Session(self.engine) as session:
                row = self._find(session, response_id, owner, admin)
                return None if row is None else row.body
        except SQLAlchemyError as exc:
            raise StoreError("be read", exc) from exc

    def conversation(self, response_id: str, owner: str | None,
                     admin: bool) -> tuple[dict, list[dict]] | None:
        """(body, input items then output items): what a response continuing
        this one starts from."""
        try:
            with Session(self.engine) as session:
                row = self._find(session, response_id, owner, admin)
                if row is None:
                    return None
                items = session.scalars(
                    select(StoredItem).where(StoredItem.response_id == response_id)
                    .order_by(StoredItem.kind, StoredItem.position)).all()
                # "input" sorts before "output"
                return row.body, [item.data for item in items]
        except SQLAlchemyError as exc:
            raise StoreError("be read", exc) from exc

    def input_items(self, response_id: str, owner: str | None, admin: bool, after: str | None,
                    limit: int, order: str) -> tuple[list[dict], bool] | None:
        """One page of a response's input items and whether more follow; None
        when the response is not there. `after` is an item id of this list."""
        try:
            with Session(self.engine) as session:
                if self._find(session, response_id, owner, admin) is None:
                    return None
                rows = select(StoredItem).where(StoredItem.response_id == response_id,
                                                StoredItem.kind == "input")
                position = StoredItem.position
                if after is not None:
                    anchor = session.scalar(select(StoredItem.position).where(
                        StoredItem.response_id == response_id, StoredItem.kind == "input",
                        StoredItem.item_id == after))
                    if anchor is None:
                        raise InvalidInput(f"No input item with id '{after}' in response "
                                           f"'{response_id}'.", param="after")
                    rows = rows.where(position > anchor if order == "asc" else position < anchor)
                rows = rows.order_by(position.asc() if order == "asc" else position.desc())
                found = session.scalars(rows.limit(limit + 1)).all()
                return [r.data for r in found[:limit]], len(found) > limit
        except SQLAlchemyError as exc:
            raise StoreError("be read", exc) from exc


_lock = threading.Lock()


def current() -> Store:
    """The current app's store, opened (and its schema created) on first use,
    so a server that never stores a response never touches the disk."""
    app = current_app._get_current_object()
    store = app.extensions.get("llmhost_store")
    if store is not None:
        return store
    with _lock:
        store = app.extensions.get("llmhost_store")
        if store is None:
            config = settings()
            url = config.DATABASE_URL or default_url(config.STATE_DIR)
            try:
                store = Store(url, ttl=config.RESPONSES_TTL)
            except SQLAlchemyError as exc:
                log.error("cannot open the response store %s: %s", url, exc)
                raise StoreError("be opened", exc) from exc
            log.info("response store: %s", make_url(url).render_as_string())
            app.extensions["llmhost_store"] = store
    return store
