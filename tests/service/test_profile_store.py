"""The database ProfileStore: same behaviour as the file store, shared across teams, unique on
key and per (profile, linear), idempotent upserts — on SQLite and Postgres."""

from __future__ import annotations

import sqlalchemy as sa

from compressor.pipeline.profile_store import FileProfileStore, LinearProfile
from service.db.models import ErrorModel, ErrorSamples, LinearSensitivity, ProfileRow
from service.db.profile_store import DbProfileStore
from service.db.session import get_database
from tests.helpers.profiles import synthetic_profile


def _counts(db, key: str) -> dict[str, int]:
    with db.session() as s:
        pid = s.scalar(sa.select(ProfileRow.id).where(ProfileRow.key == key))
        return {t.__tablename__: s.scalar(sa.select(sa.func.count()).select_from(t)
                                          .where(t.profile_id == pid))
                for t in (LinearSensitivity, ErrorSamples, ErrorModel)} | {
            "profiles": s.scalar(sa.select(sa.func.count()).select_from(ProfileRow)
                                 .where(ProfileRow.key == key))}


def test_round_trip_and_idempotent_upserts(db_url):
    db = get_database(db_url)
    store = DbProfileStore(db)
    prof = synthetic_profile()
    assert store.get(prof.key) is None and store.linear_records(prof.key) == {}
    # per-linear records land first (resumable), the profile is not complete yet
    for lp in prof.linears[:3]:
        store.put_linear(prof.key, lp)
        store.put_linear(prof.key, lp)          # a redelivered write
    assert store.get(prof.key) is None
    assert set(store.linear_records(prof.key)) == {lp.name for lp in prof.linears[:3]}
    assert _counts(db, prof.key) == {"linear_sensitivities": 3, "error_samples": 3,
                                     "error_models": 3, "profiles": 1}
    store.put(prof)
    store.put(prof)
    got = store.get(prof.key)
    assert got == prof
    assert _counts(db, prof.key) == {"linear_sensitivities": 6, "error_samples": 6,
                                     "error_models": 6, "profiles": 1}
    # an upsert updates in place: a re-measured alpha replaces the old one, no new row
    changed = LinearProfile(**(prof.linears[0].to_dict() | {"alpha": 9.5}))
    store.put_linear(prof.key, changed)
    assert store.linear_records(prof.key)[changed.name].alpha == 9.5
    assert _counts(db, prof.key)["linear_sensitivities"] == 6


def test_matches_file_store(tmp_path, sqlite_url):
    prof = synthetic_profile(n_blocks=2)
    files, dbs = FileProfileStore(tmp_path / "profiles"), DbProfileStore(get_database(sqlite_url))
    for store in (files, dbs):
        store.put_linear(prof.key, prof.linears[0])
    assert files.linear_records(prof.key) == dbs.linear_records(prof.key)
    assert files.get(prof.key) is None and dbs.get(prof.key) is None
    for store in (files, dbs):
        store.put(prof)
    assert files.get(prof.key) == dbs.get(prof.key) == prof
    # the database also keeps every linear of a complete profile as its own rows
    assert dbs.linear_records(prof.key) == {lp.name: lp for lp in prof.linears}


def test_concurrent_writers_leave_one_row_each(pg_url):
    """Two workers writing the same profile at once (a duplicate delivery): no duplicates."""
    from concurrent.futures import ThreadPoolExecutor

    db = get_database(pg_url)
    prof = synthetic_profile()

    def write(_: int) -> None:
        store = DbProfileStore(db)
        for lp in prof.linears:
            store.put_linear(prof.key, lp)
        store.put(prof)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    assert _counts(db, prof.key) == {"linear_sensitivities": 6, "error_samples": 6,
                                     "error_models": 6, "profiles": 1}
    assert DbProfileStore(db).get(prof.key) == prof


def test_non_finite_records_are_refused(db_url):
    """NaN/inf never reach the database: the record is refused with a clear message, and NaN
    summary statistics (e.g. a rank correlation over too few blocks) are stored as null."""
    import math

    import pytest

    from service.db.profile_store import CorruptRecord

    db = get_database(db_url)
    store = DbProfileStore(db)
    prof = synthetic_profile()
    bad = LinearProfile(**(prof.linears[0].to_dict() | {"alpha": math.nan}))
    with pytest.raises(CorruptRecord, match="non-finite sensitivity alpha"):
        store.put_linear(prof.key, bad)
    worse = LinearProfile(**(prof.linears[1].to_dict()
                             | {"samples": [[2, 0, math.inf]]}))
    with pytest.raises(CorruptRecord, match="error samples"):
        store.put_linear(prof.key, worse)
    assert store.linear_records(prof.key) == {}
    prof.stats["spearman_alpha_vs_proxy"] = math.nan
    store.put(prof)
    assert store.get(prof.key).stats["spearman_alpha_vs_proxy"] is None
