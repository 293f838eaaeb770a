"""Idempotent INSERT … ON CONFLICT DO UPDATE for Postgres and SQLite alike."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session


def upsert(s: Session, table: Table, rows: Sequence[dict], keys: Sequence[str],
           update_cols: Sequence[str] | None = None) -> None:
    """Insert `rows`; on a conflict on the unique `keys`, update `update_cols` (default: every
    other column given). Rerunning it with the same rows changes nothing."""
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        insert = postgresql_insert
    elif dialect == "sqlite":
        insert = sqlite_insert
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(f"upsert on {dialect}")
    stmt = insert(table).values(list(rows))
    cols = update_cols if update_cols is not None else [c for c in rows[0] if c not in keys]
    if cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                          set_={c: stmt.excluded[c] for c in cols})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    s.execute(stmt)
