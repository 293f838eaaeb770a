"""Postgres briefly unavailable (a proxy in front of the shared server is cut — the server itself
is never touched): the API answers 503 with Retry-After, never a 500 or a crash, and recovers
on its own once the database is back."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from service.db.session import dispose_all
from tests.helpers.api import RecordingQueue, make_env, make_settings
from tests.helpers.net import TcpProxy


@pytest.fixture
def proxied(tmp_path, pg_url, model_root, tiny_model):
    u = make_url(pg_url)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
    settings = make_settings(tmp_path, proxy.url_for(pg_url), model_roots=[model_root])
    env = make_env(settings, queue=RecordingQueue())
    try:
        yield env, proxy
    finally:
        proxy.close()
        env.db.dispose()


def _calls(env):
    h = env.h("alpha")
    return [("get", "/v1/models", {}), ("get", "/v1/jobs", {}), ("get", "/v1/plans", {}),
            ("post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": "0.9x"}}),
            ("get", "/v1/jobs/0123", {})], h


def test_postgres_outage_is_503_with_retry_after(proxied):
    env, proxy = proxied
    calls, h = _calls(env)
    assert env.client.get("/v1/models", headers=h).status_code == 200   # pool is warm
    proxy.cut()
    for method, path, kw in calls:
        r = getattr(env.client, method)(path, headers=h, **kw)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "database_unavailable"
    ready = env.client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert ready.json()["checks"]["database"].startswith("unreachable")
    proxy.restore()
    for method, path, kw in calls[:4]:
        r = getattr(env.client, method)(path, headers=h, **kw)
        assert r.status_code in (200, 202), (path, r.text)
    assert env.client.get("/readyz").status_code == 200


def test_postgres_down_before_first_request(tmp_path, pg_url, model_root):
    """A fresh app whose database is unreachable from the start answers 503, not 500."""
    u = make_url(pg_url)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
    try:
        settings = make_settings(tmp_path, proxy.url_for(pg_url), model_roots=[model_root])
        env = make_env(settings, queue=RecordingQueue())
        dispose_all()                       # no warm connections
        proxy.cut()
        r = env.client.get("/v1/models", headers=env.h("alpha"))
        assert r.status_code == 503 and r.headers["retry-after"], r.text
    finally:
        proxy.close()
