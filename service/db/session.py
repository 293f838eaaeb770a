"""Engines and sessions, one `Database` per URL (cached), with SQLite tuned for concurrent use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import ColumnElement, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         pool_recycle=1800)


def serialize_on(s: Session, column: ColumnElement, key: object) -> None:
    """Serialise this transaction, until it ends, with every other that takes the same lock, so
    a read-then-write (count, then insert) is atomic. Postgres: the row `column == key` FOR
    UPDATE (later reads in READ COMMITTED see what the previous holder committed). SQLite locks
    whole databases: BEGIN IMMEDIATE takes the write lock before anything is read (the driver
    begins only at the first write, and a deferred reader cannot upgrade safely); a transaction
    that has written already holds it."""
    conn = s.connection()
    if conn.dialect.name == "sqlite":
        if not conn.connection.dbapi_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    s.execute(select(column).where(column == key).with_for_update())


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        s = self.sessionmaker()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


_DATABASES: dict[str, Database] = {}
_LOCK = threading.Lock()


def get_database(url: str) -> Database:
    with _LOCK:
        db = _DATABASES.get(url)
        if db is None:
            db = _DATABASES[url] = Database(url)
        return db


def dispose_all() -> None:
    with _LOCK:
        for db in _DATABASES.values():
            db.dispose()
        _DATABASES.clear()
