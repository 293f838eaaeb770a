"""Which live process runs an in-process job. Every process that claims jobs for its in-process
queue first takes a lock named after its owner id and keeps it until it dies: a file lock
(flock) beside the SQLite file, or a session advisory lock on Postgres. The kernel or the
database drops that lock when the process dies, so "nobody holds the owner's lock" proves the
owner is gone and its running jobs are orphans that can be re-queued at once, without waiting
for their lease; a live owner's lock is held, so its jobs are never taken."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import IO

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from service.db.session import Database

log = logging.getLogger(__name__)
OWNER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _lock_dir(db: Database) -> Path | None:
    path = db.engine.url.database
    if not path or path == ":memory:":
        return None
    p = Path(path).resolve()
    return p.parent / f".{p.name}.owners"


def _digest(owner: str) -> bytes:
    return hashlib.sha256(owner.encode()).digest()


def _pg_key(owner: str) -> int:
    return int.from_bytes(_digest(owner)[:8], "big", signed=True)


class Liveness:
    """The lock that says `owner` is alive; held until `release()` or the process's end."""

    def __init__(self, owner: str, file: IO | None, conn: Connection | None) -> None:
        self.owner, self._file, self._conn = owner, file, conn

    @classmethod
    def acquire(cls, db: Database, owner: str) -> Liveness:
        if db.is_sqlite:
            d = _lock_dir(db)
            if d is None:
                raise ValueError("an in-memory SQLite database has no other processes")
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{_digest(owner).hex()[:32]}.lock"
            while True:
                f = open(path, "a+")  # kept open: it is the lock
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    return cls(owner, f, None)
                f.close()            # unlinked by a reclaimer between open and lock: again
        # its own connection, outside the pool: the lock lives exactly as long as it does
        conn = sa.create_engine(db.url, poolclass=NullPool).connect()
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _pg_key(owner)})
        conn.commit()
        return cls(owner, None, conn)

    def alive(self) -> bool:
        """Postgres: the lock lives as long as its connection; a restarted server drops it."""
        if self._conn is None:
            return True
        try:
            self._conn.execute(sa.text("SELECT 1"))
            self._conn.commit()
            return True
        except sa.exc.DBAPIError:
            return False

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._conn is not None:
            self._conn.close()


_HELD: dict[str, Liveness] = {}
_LOCK = threading.Lock()


def hold(db: Database) -> str | None:
    """This process's owner id, once its lock is held for `db` (for the process's lifetime);
    None where no other process can share the database (SQLite in memory)."""
    with _LOCK:
        held = _HELD.get(db.url)
        if held is not None and not held.alive():     # lost with its connection: take it again
            log.warning("liveness lock for %s was lost; re-taking it", db.url)
            held.release()
            del _HELD[db.url]
        if db.url not in _HELD:
            if db.is_sqlite and _lock_dir(db) is None:
                return None
            try:
                _HELD[db.url] = Liveness.acquire(db, OWNER_ID)
                if db.is_sqlite:
                    _clean(_lock_dir(db))
            except OSError:   # e.g. a read-only directory: recovery falls back to the lease
                log.warning("cannot hold a liveness lock for %s", db.url, exc_info=True)
                return None
    return OWNER_ID


def _clean(d: Path) -> None:
    """Remove the lock files of dead processes (nobody holds them; ours is held)."""
    for path in d.glob("*.lock"):
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)


def is_dead(db: Database, owner: str) -> bool:
    """True only when no live process holds `owner`'s lock."""
    if db.is_sqlite:
        d = _lock_dir(db)
        if d is None:
            return False
        path = d / f"{_digest(owner).hex()[:32]}.lock"
        if not path.exists():       # owners lock before they claim: never lived, or cleaned up
            return True
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)     # still locked by us: nobody can be using it
            return True
    with db.engine.connect() as conn:
        got = conn.scalar(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _pg_key(owner)})
        if got:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _pg_key(owner)})
        conn.commit()
        return bool(got)
