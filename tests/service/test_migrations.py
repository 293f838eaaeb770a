"""Alembic is the only way the schema is created: empty → head on Postgres and SQLite, the
migrated schema matches the ORM exactly, and it downgrades cleanly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.db.migrate import current, downgrade, head, upgrade
from service.db.models import Base

TABLES = {"teams", "api_keys", "models", "profiles", "linear_sensitivities", "error_samples",
          "error_models", "jobs", "plans", "artifacts", "ui_sessions", "workers"}


def _check_empty_to_head(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == set()
        upgrade(url)
        assert current(url) == head()
        names = set(sa.inspect(engine).get_table_names())
        assert TABLES <= names and "alembic_version" in names
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"ORM and migrations disagree: {diff}"
        upgrade(url)                       # rerunning is a no-op
        downgrade(url, "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert current(url) == head()
    finally:
        engine.dispose()


def test_sqlite_empty_to_head(tmp_path):
    _check_empty_to_head(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_postgres_empty_to_head(fresh_pg_url):
    _check_empty_to_head(fresh_pg_url)


def test_unique_constraints_exist_on_postgres(pg_url):
    insp = sa.inspect(sa.create_engine(pg_url))
    uniques = {t: {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)}
               for t in ("profiles", "linear_sensitivities", "error_samples", "error_models",
                         "jobs", "artifacts", "api_keys")}
    assert ("key",) in uniques["profiles"]
    for t in ("linear_sensitivities", "error_samples", "error_models"):
        assert ("profile_id", "linear") in uniques[t]
    assert ("team_id", "idempotency_key") in uniques["jobs"]
    assert ("dedup_key",) in uniques["jobs"]
    assert ("plan_id",) in uniques["artifacts"]
    assert ("key_id",) in uniques["api_keys"]


def _check_target_migration(url: str) -> None:
    """0005 adds plans.target and profiles.target: old rows read native, a stored gguf profile
    (its config names the target) reads gguf; 0006 makes room for "compressed-tensors"; down
    and up again cleanly."""
    engine = sa.create_engine(url)
    now = sa.func.current_timestamp()
    try:
        upgrade(url, "0004")
        meta = sa.MetaData()
        meta.reflect(engine, only=["teams", "models", "plans", "profiles"])
        t = meta.tables
        with engine.begin() as conn:
            conn.execute(t["teams"].insert().values(id="t1", name="team", created_at=now))
            conn.execute(t["models"].insert().values(
                id="m1", ref="tiny", path="/m", fingerprint="f", num_linears=0, linear_params=0,
                kept_bytes=0, inventory={}, created_at=now))
            conn.execute(t["plans"].insert().values(
                id="p1", team_id="t1", model_id="m1", budget="1GB", method="exact",
                constraints={}, compress=False, status="pending", result={}, created_at=now))
            for pid, config in (("native", {"q_bits": [2, 4]}), ("gguf", {"target": "gguf"})):
                conn.execute(t["profiles"].insert().values(
                    id=pid, key=pid, model_id="m1", config=config, fixed_bytes=0,
                    linear_order=[], block_sensitivity=[], block_proxy=[], stats={},
                    complete=True, created_at=now))
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT target FROM plans")).scalar_one() == "native"
            assert dict(conn.execute(sa.text("SELECT id, target FROM profiles")).all()) == \
                {"native": "native", "gguf": "gguf"}
        with engine.begin() as conn:   # 0006: wide enough for the vLLM target's name
            conn.execute(sa.text("UPDATE plans SET target = 'compressed-tensors'"))
            assert conn.execute(sa.text("SELECT target FROM plans")).scalar_one() == \
                "compressed-tensors"
            conn.execute(sa.text("UPDATE plans SET target = 'native'"))   # 0005 cannot hold it
        downgrade(url, "0004")
        insp = sa.inspect(engine)
        for table in ("plans", "profiles"):
            assert "target" not in {c["name"] for c in insp.get_columns(table)}
        upgrade(url)
        assert current(url) == head()
    finally:
        engine.dispose()


def test_target_migration_sqlite(tmp_path):
    _check_target_migration(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_target_migration_postgres(fresh_pg_url):
    _check_target_migration(fresh_pg_url)
