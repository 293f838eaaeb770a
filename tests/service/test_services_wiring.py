"""Prove the wiring to the real PostgreSQL and Redis of this machine (and CI)."""

import uuid

import sqlalchemy as sa


def test_postgres_roundtrip(postgres_url):
    engine = sa.create_engine(postgres_url)
    table = f"wiring_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TEMP TABLE {table} (k text primary key, v int)"))
        conn.execute(sa.text(f"INSERT INTO {table} VALUES ('a', 41), ('b', 1)"))
        total = conn.execute(sa.text(f"SELECT sum(v) FROM {table}")).scalar_one()
        version = conn.execute(sa.text("SHOW server_version")).scalar_one()
    assert total == 42
    assert int(version.split(".")[0]) >= 12


def test_redis_roundtrip(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"bitplan:test:{uuid.uuid4().hex}"
    try:
        client.set(key, "42", ex=30)
        assert client.incr(key) == 43
        assert client.ttl(key) > 0
    finally:
        client.delete(key)
