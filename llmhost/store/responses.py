"""Stored responses: the Responses API's `store` (on by default, as OpenAI),
`previous_response_id`, and the retrieve / delete / input_items routes.

SQLAlchemy (2.x ORM) because it is the well-kept way to speak to SQLite (the
default: one file under LLMHOST_STATE_DIR, no service to run) and to
PostgreSQL through LLMHOST_DATABASE_URL, so replicas share one store. The
schema is Alembic's (llmhost/store/migrations): SQLite creates and upgrades
itself on first use; PostgreSQL is upgraded by `llmhost db upgrade` (a
Kubernetes Job, or by hand), and a replica that finds its database behind
says so (/ready 503, and a 503 on every stored-response route).

Each response keeps its context (the items of the responses it continued and
its own input) as its input items, and its output items: continuing a
response never needs another row, so deleting or expiring an earlier turn
never breaks a later one. That copy is bounded: a conversation over
LLMHOST_MAX_STORED_INPUT_BYTES is refused (api/responses.py).

A response being generated holds a lease (LLMHOST_RESPONSES_LEASE seconds,
renewed by the server generating it): once the lease has passed, a response
still `in_progress` reads as `failed` (its replica died), and a server that
starts again marks its own unfinished ones failed at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from typing import Any, Iterator

from flask import current_app
from sqlalchemy import (JSON, Float, ForeignKey, Integer, String, create_engine, delete, inspect, select,
                        text, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from ..config import server_id, settings, state_dir
from ..engine.errors import InvalidInput, Refused, ServerFailure, Unavailable

log = logging.getLogger("llmhost")

# pg_advisory_lock key of `llmhost db upgrade` (any constant; "llmhost" in ASCII)
MIGRATION_LOCK = 0x6C6C6D686F7374
VERSION_TABLE = "llmhost_alembic_version"

# PostgreSQL's jsonb cannot hold U+0000 (text values refuse it too). Strings are
# escaped on the way in with a private-use character and restored on the way
# out, so a model output holding NUL round-trips and stays queryable.
_ESC = "\ue000"
_UNESCAPE = re.compile("\ue000(.)", re.S)


def _map(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k): _map(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    return value


def _escape(s: str) -> str:
    if "\x00" not in s and _ESC not in s:
        return s
    return s.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def _unescape(s: str) -> str:
    if _ESC not in s:
        return s
    return _UNESCAPE.sub(lambda m: _ESC if m[1] == _ESC else "\x00", s)


class Document(TypeDecorator):
    """JSON on SQLite, jsonb on PostgreSQL (queryable, indexable), NUL-safe."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":   # its dialect imported only where it is used (2 MiB)
            from sqlalchemy.dialects.postgresql import JSONB
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value, dialect):
        return _map(value, _escape) if dialect.name == "postgresql" else value

    def process_result_value(self, value, dialect):
        return _map(value, _unescape) if dialect.name == "postgresql" else value


class Base(DeclarativeBase):
    pass


class StoredResponse(Base):
    __tablename__ = "llmhost_responses"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    # SHA-256 of the API key that created it (None when the server has no keys).
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    body: Mapped[dict] = mapped_column(Document)
    # The body's status, and who generates it until when (see the module doc).
    status: Mapped[str | None] = mapped_column(String(16))
    server_id: Mapped[str | None] = mapped_column(String(200), index=True)
    lease_until: Mapped[float | None] = mapped_column(Float)


class StoredItem(Base):
    __tablename__ = "llmhost_response_items"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(
        String(80), ForeignKey("llmhost_responses.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))          # "input" or "output"
    position: Mapped[int] = mapped_column(Integer)
    item_id: Mapped[str] = mapped_column(String(80))
    data: Mapped[dict] = mapped_column(Document)


def database_url(config) -> str:
    return config.DATABASE_URL or "sqlite:///" + os.path.join(state_dir(config), "llmhost.db")


class StoreError(ServerFailure):
    """The store could not be read or written: a 500 that says so. The failed
    transaction is rolled back, so nothing stored before is touched."""

    def __init__(self, action: str, exc: BaseException) -> None:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        super().__init__(f"The response store could not {action} ({reason}). Responses "
                         "stored before are unaffected; check LLMHOST_DATABASE_URL / "
                         "LLMHOST_STATE_DIR, or send `store: false`.", code="store_unavailable")


class StoreBehind(Unavailable):
    """The database's schema is older than this llmhost's: someone must run
    `llmhost db upgrade` (a 503: retry once they have)."""

    def __init__(self, found: str | None, head: str) -> None:
        super().__init__(f"The response store's schema is at revision {found or 'none'}, this "
                         f"llmhost needs {head}: run `llmhost db upgrade` (the migration Job "
                         "in Kubernetes) against LLMHOST_DATABASE_URL.",
                         code="store_needs_upgrade", retry_after=30)


# -- migrations ----------------------------------------------------------------------

def _alembic(connection):
    # Alembic: the maintained migration tool for SQLAlchemy schemas.
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", os.path.join(os.path.dirname(__file__), "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


# The newest migration (migrations/versions/; tests check it is Alembic's head): a store
# already at it opens without importing Alembic, which with Mako and Pygments is about
# 10 MiB of worker memory (docs/performance.md, "Memory").
HEAD = "0003"


def head_revision() -> str:
    return HEAD


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory
    return {s.revision for s in ScriptDirectory.from_config(_alembic(None)).walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in Alembic's version table (None: no schema yet),
    read with plain SQL (see HEAD)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


@contextlib.contextmanager
def _migration_lock(engine: Engine, conn) -> Iterator[None]:
    """One migrator at a time: a PostgreSQL advisory lock (held by this
    connection's session), or a file lock beside a SQLite file."""
    if engine.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()
        return
    db = engine.url.database or ""
    if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        yield
        return
    import fcntl
    with open(os.path.abspath(db) + ".migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the head revision: idempotent, and safe when several
    processes run it at once. (revision before, revision after)."""
    head = head_revision()
    before = current_revision(engine)
    if before == head:
        return before, head
    from alembic import command

    with engine.connect() as conn, _migration_lock(engine, conn):
        command.upgrade(_alembic(conn), "head")
        conn.commit()
    return before, head


# -- the store -------------------------------------------------------------------------

class Store:
    """Thread-safe: every call uses its own session (and connection from the
    engine's pool); SQLite writers wait for each other (busy timeout) instead
    of failing."""

    def __init__(self, url: str, ttl: float = 0.0, *, lease: float = 60.0,
                 server_id: str = "", pool: tuple[int, int, float] = (5, 10, 30.0),
                 migrate: bool | None = None) -> None:
        self.url = url
        self.ttl = ttl
        self.lease = lease
        self.server_id = server_id or f"process-{uuid.uuid4().hex[:12]}"
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            connect_args["timeout"] = 60          # seconds a writer waits for the lock
            db = parsed.database or ""
            if db and db != ":memory:" and not db.startswith("file:"):
                os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        else:
            options = {"pool_size": pool[0], "max_overflow": pool[1], "pool_timeout": pool[2]}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True, **options)
        self.dialect = self.engine.dialect.name
        self.head = head_revision()
        self.found = current_revision(self.engine)
        if self.found not in (None, self.head) and self.found not in _known_revisions():
            raise RuntimeError(f"The response store at {parsed.render_as_string()} has schema "
                               f"revision {self.found}, written by a newer llmhost (this one "
                               f"knows up to {self.head}).")
        # SQLite upgrades itself; PostgreSQL waits for `llmhost db upgrade`.
        if self.found != self.head and (self.dialect == "sqlite" if migrate is None else migrate):
            self.found = upgrade(self.engine)[1]
        self._leases: set[str] = set()
        self._leases_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop renewing leases and close the connections (their responses
        then read failed once the lease passes, as if this server stopped)."""
        self._closed.set()
        self.engine.dispose()

    # -- readiness ----------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreBehind while the database is older than this llmhost."""
        if self.found != self.head:
            self.found = current_revision(self.engine)
            if self.found != self.head:
                raise StoreBehind(self.found, self.head)

    @contextlib.contextmanager
    def _session(self, action: str, write: bool = False) -> Iterator[Session]:
        self.check()
        try:
            with Session(self.engine) as session:
                if write:
                    with session.begin():
                        yield session
                else:
                    yield session
        except SQLAlchemyError as exc:
            log.error("the response store could not %s: %s", action, exc)
            raise StoreError(action, exc) from exc

    # -- writes -------------------------------------------------------------------

    def create(self, body: dict, owner: str | None, input_items: list[dict]) -> None:
        """Store a new response (usually in_progress, under this server's lease)
        with its input items; old responses past LLMHOST_RESPONSES_TTL go in the
        same transaction. Item ids repeated by the client are made unique, so
        every item has its own place in input_items' paging."""
        running = body.get("status") == "in_progress"
        with self._session("store this response", write=True) as session:
            self._expire(session)
            session.add(StoredResponse(
                id=body["id"], owner=owner, created_at=float(body["created_at"]), body=body,
                status=body.get("status"), server_id=self.server_id if running else None,
                lease_until=time.time() + self.lease if running else None))
            session.flush()        # the parent row before its items (the foreign key)
            seen: set[str] = set()
            rows = []
            for i, item in enumerate(input_items):
                if item.get("id") in seen or not item.get("id"):
                    item = {**item, "id": f"item_{uuid.uuid4().hex}"}
                seen.add(item["id"])
                rows.append(StoredItem(response_id=body["id"], kind="input", position=i,
                                       item_id=item["id"], data=item))
            session.add_all(rows)
        if running:
            self._hold(body["id"])

    def finish(self, body: dict) -> None:
        """The final body of a stored response, and its output items."""
        try:
            with self._session("store this response", write=True) as session:
                row = session.get(StoredResponse, body["id"])
                if row is None:        # deleted (or expired) while it was generated
                    return
                row.body = body
                row.status = body.get("status")
                row.lease_until = None
                session.add_all(StoredItem(response_id=body["id"], kind="output", position=i,
                                           item_id=item["id"], data=item)
                                for i, item in enumerate(body["output"]))
        finally:
            self._release(body["id"])

    def delete(self, response_id: str, owner: str | None, admin: bool) -> bool:
        """True for the one call that deleted it: the DELETE's own row count
        decides, so two concurrent deletes never both succeed."""
        with self._session("delete this response", write=True) as session:
            query = delete(StoredResponse).where(StoredResponse.id == response_id)
            if not admin:
                query = query.where(StoredResponse.owner == owner)
            if self.ttl:
                query = query.where(StoredResponse.created_at >= time.time() - self.ttl)
            if session.execute(query).rowcount != 1:
                return False
            # PostgreSQL cascades; SQLite enforces no foreign keys unless told to.
            session.execute(delete(StoredItem).where(StoredItem.response_id == response_id))
            return True

    def _expire(self, session: Session) -> None:
        if not self.ttl:
            return
        cutoff = time.time() - self.ttl
        old = select(StoredResponse.id).where(StoredResponse.created_at < cutoff)
        session.execute(delete(StoredItem).where(StoredItem.response_id.in_(old)))
        session.execute(delete(StoredResponse).where(StoredResponse.created_at < cutoff))

    # -- leases -------------------------------------------------------------------

    def _hold(self, response_id: str) -> None:
        with self._leases_lock:
            self._leases.add(response_id)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, name="llmhost-leases",
                                                 daemon=True)
                self._renewer.start()

    def _release(self, response_id: str) -> None:
        with self._leases_lock:
            self._leases.discard(response_id)

    def _renew(self) -> None:
        """Extend the leases of the responses this server is generating."""
        while not self._closed.wait(max(self.lease / 3, 0.2)):
            with self._leases_lock:
                held = list(self._leases)
            if not held:
                continue
            try:
                with Session(self.engine) as session, session.begin():
                    session.execute(update(StoredResponse)
                                    .where(StoredResponse.id.in_(held),
                                           StoredResponse.status == "in_progress")
                                    .values(lease_until=time.time() + self.lease))
            except SQLAlchemyError as exc:
                log.warning("could not renew the leases of %d stored responses: %s",
                            len(held), exc)

    def fail_abandoned(self, server_id: str | None = None) -> int:
        """Mark failed the responses left in_progress by `server_id` (this
        server, restarting: its generations died with the old process)."""
        server_id = server_id or self.server_id
        with self._session("mark abandoned responses failed", write=True) as session:
            rows = session.scalars(select(StoredResponse).where(
                StoredResponse.server_id == server_id,
                StoredResponse.status == "in_progress")).all()
            for row in rows:
                row.body = _failed(row.body, "the server generating it restarted before it "
                                             "finished")
                row.status, row.lease_until = "failed", None
            return len(rows)

    # -- reads --------------------------------------------------------------------

    def _find(self, session: Session, response_id: str, owner: str | None,
              admin: bool) -> StoredResponse | None:
        query = select(StoredResponse).where(StoredResponse.id == response_id)
        if not admin:            # keys are set and this one is no admin key: its own only
            query = query.where(StoredResponse.owner == owner)
        if self.ttl:
            query = query.where(StoredResponse.created_at >= time.time() - self.ttl)
        return session.scalar(query)

    @staticmethod
    def _body(row: StoredResponse) -> dict:
        """The stored body; one whose lease passed while in_progress reads failed."""
        if row.status == "in_progress" and row.lease_until and row.lease_until < time.time():
            return _failed(row.body, "the server generating it stopped before it finished "
                                     "(its lease expired)")
        return row.body

    def get(self, response_id: str, owner: str | None, admin: bool) -> dict | None:
        with self._session("be read") as session:
            row = self._find(session, response_id, owner, admin)
            return None if row is None else self._body(row)

    def conversation(self, response_id: str, owner: str | None,
                     admin: bool) -> tuple[dict, list[dict]] | None:
        """(body, input items then output items): what a response continuing
        this one starts from."""
        with self._session("be read") as session:
            row = self._find(session, response_id, owner, admin)
            if row is None:
                return None
            items = session.scalars(
                select(StoredItem).where(StoredItem.response_id == response_id)
                .order_by(StoredItem.kind, StoredItem.position)).all()
            # "input" sorts before "output"
            return self._body(row), [item.data for item in items]

    def input_items(self, response_id: str, owner: str | None, admin: bool, after: str | None,
                    limit: int, order: str) -> tuple[list[dict], bool] | None:
        """One page of a response's input items and whether more follow; None
        when the response is not there. `after` is an item id of this list
        (unique: create() sees to that), paging goes by stored position."""
        with self._session("be read") as session:
            if self._find(session, response_id, owner, admin) is None:
                return None
            rows = select(StoredItem).where(StoredItem.response_id == response_id,
                                            StoredItem.kind == "input")
            position = StoredItem.position
            if after is not None:
                anchor = session.scalar(select(position).where(
                    StoredItem.response_id == response_id, StoredItem.kind == "input",
                    StoredItem.item_id == after).order_by(position).limit(1))
                if anchor is None:
                    raise InvalidInput(f"No input item with id '{after}' in response "
                                           f"'{response_id}'.", param="after")
                rows = rows.where(position > anchor if order == "asc" else position < anchor)
            rows = rows.order_by(position.asc() if order == "asc" else position.desc())
            found = session.scalars(rows.limit(limit + 1)).all()
            return [r.data for r in found[:limit]], len(found) > limit


def _failed(body: dict, reason: str) -> dict:
    return {**body, "status": "failed", "completed_at": None,
            "error": {"code": "server_error", "message": f"This response failed: {reason}."}}


def open_store(config) -> Store:
    return Store(database_url(config), ttl=config.RESPONSES_TTL, lease=config.RESPONSES_LEASE,
                 server_id=server_id(config),
                 pool=(config.DB_POOL_SIZE, config.DB_MAX_OVERFLOW, config.DB_POOL_TIMEOUT))


def fail_abandoned_at_start(app, config) -> None:
    """A (re)starting server marks the responses it left in_progress failed at
    once, in the background, when it has a store to look in."""
    url = database_url(config)
    if config.TESTING or not (config.DATABASE_URL or os.path.exists(make_url(url).database or "")):
        return

    def run() -> None:
        with app.app_context():
            try:
                count = current().fail_abandoned()
            except Refused as exc:
                log.warning("could not mark this server's unfinished responses failed: %s",
                            exc.message)
                return
            if count:
                log.warning("marked %d stored responses failed: this server restarted while "
                            "generating them", count)

    threading.Thread(target=run, name="llmhost-store-recovery", daemon=True).start()


_lock = threading.Lock()


def current() -> Store:
    """The current app's store, opened (and, on SQLite, its schema created) on
    first use, so a server that never stores a response never touches the disk."""
    app = current_app._get_current_object()
    store = app.extensions.get("llmhost_store")
    if store is not None:
        return store
    with _lock:
        store = app.extensions.get("llmhost_store")
        if store is None:
            config = settings()
            url = database_url(config)
            try:
                store = open_store(config)
            except SQLAlchemyError as exc:
                log.error("cannot open the response store %s: %s", url, exc)
                raise StoreError("be opened", exc) from exc
            log.info("response store: %s", make_url(url).render_as_string())
            app.extensions["llmhost_store"] = store
    return store
