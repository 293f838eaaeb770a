"""The pytest fixtures every test directory shares, registered once from tests/conftest.py
(`pytest_plugins`): the shared Postgres/Redis (skipped, or failed in CI, when unreachable), a
private Postgres database per session or per test, migrated SQLite files, the demo model, and
tiny safetensors models under one model root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db.migrate import upgrade
from tests.helpers.backends import (
    POSTGRES_URL,
    REDIS_URL,
    create_pg_database,
    drop_pg_database,
    require,
)
from tests.helpers.paths import DEMO_MODEL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.fail(f"demo model missing at {DEMO_MODEL}; train it with `bitplan train-demo`")
    return DEMO_MODEL


@pytest.fixture
def fresh_pg_url(postgres_url) -> Iterator[str]:
    """An empty Postgres database for this one test."""
    url = create_pg_database(postgres_url)
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def pg_url(postgres_url) -> Iterator[str]:
    """A Postgres database migrated to head, private to this test session."""
    url = create_pg_database(postgres_url)
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'bitplan.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request) -> str:
    """Run the test on both databases (each migrated to head). The Postgres one is shared by
    the session: use `own_db_url` where rows left by other tests would change the outcome."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", "postgres"])
def own_db_url(request) -> Iterator[str]:
    """Both databases, each this test's own and migrated to head (e.g. a test that expects to
    create a model's shared profile job, which another test may already have queued)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
        return
    url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    yield url


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-root")


@pytest.fixture(scope="session")
def tiny_model(model_root) -> Path:
    """A random 2-block Qwen2 with a word-level tokenizer, written once per session."""
    # torch only when a test asks for a model: solver and API test runs stay light
    from tests.helpers.models import write_tiny_model

    return write_tiny_model(model_root / "tiny-qwen")


@pytest.fixture(scope="session")
def tiny_nan_model(model_root) -> Path:
    """The tiny model with a NaN in one weight of block 0's q_proj."""
    from tests.helpers.models import write_tiny_model  # torch only when asked for (above)

    return write_tiny_model(model_root / "tiny-nan", nan_in="model.layers.0.self_attn.q_proj")


@pytest.fixture
def cli_home(tmp_path, monkeypatch) -> Iterator[Path]:
    """BITPLAN_DATA_DIR with a stored (synthetic) profile for the CLI reference `tiny`."""
    from compressor.pipeline.profile_store import FileProfileStore
    from service.cli import planning
    from service.settings import get_settings
    from tests.helpers.profiles import synthetic_profile

    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    prof = synthetic_profile()
    FileProfileStore(planning.profile_root()).put(prof)
    planning.remember("tiny", prof.key)
    yield tmp_path
    get_settings.cache_clear()
