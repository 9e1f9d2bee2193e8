"""Per-key usage and token quotas, in the same SQL database as stored responses
(SQLite by default, PostgreSQL when replicas share one).

Usage is counted in memory per (hour, key, model, endpoint) and written in
batches by one thread (every LLMHOST_USAGE_FLUSH_S and at shutdown), so a
request adds no database round trip for it. A write that fails keeps its
counts for the next try (bounded), and is logged and counted: the store never
blocks serving.

Quotas (tokens per day or month) must hold across replicas, so they are one
row per (subject, period) updated atomically in the database itself: a
request reserves its worst case with a conditional increment
(`tokens + n <= quota`), which either fits or changes nothing, and settles the
real count at its end. Two replicas cannot both take the last tokens.

The tables belong to the store's Alembic migrations (versions/0003_usage.py):
SQLite creates them when the response store upgrades itself, PostgreSQL with
`llmhost db upgrade`; a database behind is refused before this store opens
(llmhost/http/metering.py), as for stored responses. The classes below map
them and must match that migration (tests/test_store_pg.py compares the two).
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import dataclass

from sqlalchemy import BigInteger, Float, String, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

log = logging.getLogger("llmhost")

FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors")


class Base(DeclarativeBase):
    pass


class UsageRow(Base):
    __tablename__ = "llmhost_usage"

    hour: Mapped[float] = mapped_column(Float, primary_key=True)       # unix time, hour start
    key: Mapped[str] = mapped_column(String(64), primary_key=True)     # key digest or ""
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_name: Mapped[str | None] = mapped_column(String(128), index=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)


class QuotaRow(Base):
    __tablename__ = "llmhost_quota"

    subject: Mapped[str] = mapped_column(String(200), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)  # d:2026-12-03, m:2026-12
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


@dataclass(frozen=True)
class Record:
    key: str            # digest hex, "" on a keyless server
    key_name: str | None
    model: str
    endpoint: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0


def periods(now: float) -> dict[str, str]:
    """The quota periods `now` falls in (UTC)."""
    t = time.gmtime(now)
    return {"day": time.strftime("d:%Y-%m-%d", t), "month": time.strftime("m:%Y-%m", t)}


class UsageStore:
    MAX_PENDING = 50_000          # distinct rows kept while the database is down

    def __init__(self, engine, flush_s: float = 5.0) -> None:
        self.engine = engine      # at the store's head revision: its tables are Alembic's (0003)
        self.flush_s = flush_s
        self.failures = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[tuple, list] = {}
        self._names: dict[str, str | None] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llmhost-usage", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s.close())

    # -- usage ------------------------------------------------------------------

    def add(self, record: Record, now: float | None = None) -> None:
        hour = float(int((now or time.time()) // 3600 * 3600))
        key = (hour, record.key, record.model, record.endpoint)
        with self._lock:
            counts = self._pending.get(key)
            if counts is None:
                if len(self._pending) >= self.MAX_PENDING:
                    self.dropped += 1
                    return
                counts = self._pending[key] = [0] * len(FIELDS)
                self._names[record.key] = record.key_name
            for i, name in enumerate(FIELDS):
                counts[i] += getattr(record, name)

    def flush(self) -> bool:
        """Write what is pending; on failure keep it for the next try."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                names = dict(self._names)
            if not batch:
                return True
            try:
                with Session(self.engine) as session, session.begin():
                    for (hour, key, model, endpoint), counts in batch.items():
                        self._upsert(session, hour, key, names.get(key), model, endpoint, counts)
            except SQLAlchemyError as exc:
                self.failures += 1
                log.error("usage could not be written (kept for the next try): %s",
                          str(exc).splitlines()[0][:200])
                with self._lock:
                    for key, counts in batch.items():
                        now = self._pending.setdefault(key, [0] * len(FIELDS))
                        for i, value in enumerate(counts):
                            now[i] += value
                return False
            return True

    @staticmethod
    def _upsert(session: Session, hour, key, name, model, endpoint, counts) -> None:
        where = ((UsageRow.hour == hour) & (UsageRow.key == key) & (UsageRow.model == model)
                 & (UsageRow.endpoint == endpoint))
        values = {f: getattr(UsageRow, f) + counts[i] for i, f in enumerate(FIELDS)}
        if session.execute(update(UsageRow).where(where).values(**values)).rowcount:
            return
        try:
            with session.begin_nested():
                session.execute(insert(UsageRow).values(
                    hour=hour, key=key, key_name=name, model=model, endpoint=endpoint,
                    **{f: counts[i] for i, f in enumerate(FIELDS)}))
        except IntegrityError:        # another replica inserted it meanwhile
            session.execute(update(UsageRow).where(where).values(**values))

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if not self._closed:
                self.flush()

    def close(self) -> None:
        """Write what is left (a clean shutdown loses nothing)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self.flush()

    def report(self, key: str | None = None, key_name: str | None = None,
               model: str | None = None, endpoint: str | None = None,
               start: float | None = None, end: float | None = None,
               group_by: tuple[str, ...] = ("key", "model", "endpoint", "hour")) -> list[dict]:
        """Summed rows, grouped by any of key, model, endpoint, hour and day."""
        self.flush()
        columns = {"key": UsageRow.key, "model": UsageRow.model, "endpoint": UsageRow.endpoint,
                   "hour": UsageRow.hour}
        groups = [columns[g] for g in group_by if g in columns]
        if "key" in group_by:
            groups.append(UsageRow.key_name)
        if "day" in group_by:
            groups.append((func.floor(UsageRow.hour / 86400) * 86400).label("day"))
        sums = [func.sum(getattr(UsageRow, f)).label(f) for f in FIELDS]
        query = select(*groups, *sums)
        for column, value in ((UsageRow.key, key), (UsageRow.key_name, key_name),
                              (UsageRow.model, model), (UsageRow.endpoint, endpoint)):
            if value is not None:
                query = query.where(column == value)
        if start is not None:
            query = query.where(UsageRow.hour >= start // 3600 * 3600)
        if end is not None:
            query = query.where(UsageRow.hour < end)
        if groups:
            query = query.group_by(*groups).order_by(*groups)
        with Session(self.engine) as session:
            rows = session.execute(query).mappings().all()
        return [{k: (int(v) if k in FIELDS else v) for k, v in row.items()} for row in rows]

    # -- quotas -----------------------------------------------------------------

    def reserve(self, subject: str, period: str, tokens: int, quota: int) -> bool:
        """Add `tokens` to the period's count if it stays within `quota`, in one
        statement; False (nothing changed) when it would not."""
        where = (QuotaRow.subject == subject) & (QuotaRow.period == period)
        with Session(self.engine) as session, session.begin():
            done = session.execute(update(QuotaRow).where(
                where & (QuotaRow.tokens + tokens <= quota)).values(
                tokens=QuotaRow.tokens + tokens)).rowcount
            if done:
                return True
            if session.scalar(select(QuotaRow.tokens).where(where)) is not None:
                return False
            if tokens > quota:
                return False
            try:
                with session.begin_nested():
                    session.execute(insert(QuotaRow).values(subject=subject, period=period,
                                                            tokens=tokens))
                return True
            except IntegrityError:    # created by another replica meanwhile: try once more
                return bool(session.execute(update(QuotaRow).where(
                    where & (QuotaRow.tokens + tokens <= quota)).values(
                    tokens=QuotaRow.tokens + tokens)).rowcount)

    def settle(self, subject: str, period: str, delta: int) -> None:
        """Correct a reservation by the real count (delta may be negative)."""
        if not delta:
            return
        with Session(self.engine) as session, session.begin():
            session.execute(update(QuotaRow).where(
                (QuotaRow.subject == subject) & (QuotaRow.period == period)).values(
                tokens=QuotaRow.tokens + delta))

    def used(self, subject: str, period: str) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(QuotaRow.tokens).where(
                (QuotaRow.subject == subject) & (QuotaRow.period == period))) or 0)
