"""The REST API on real databases: errors are JSON 4xx with clear messages, teams are isolated,
profiles are shared (one profile job per model), idempotency keys replay or conflict."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.db.auth import revoke_key
from service.db.models import Job, ModelRow, PlanRow
from tests.helpers.api import RecordingQueue, make_env, make_settings


@pytest.fixture
def env(tmp_path, own_db_url, model_root, tiny_model):
    settings = make_settings(tmp_path, own_db_url, model_roots=[model_root])
    return make_env(settings, queue=RecordingQueue())


def _plan(env, team="alpha", **kw):
    body = {"model": "tiny-qwen", "budget": "0.9x"} | kw
    return env.client.post("/v1/plans", json=body, headers=env.h(team))


BAD_REQUESTS = [
    # (description, method, path, kwargs, status, code)
    ("no key", "get", "/v1/models", {}, 401, "unauthorized"),
    ("wrong scheme", "get", "/v1/models", {"headers": {"Authorization": "Basic eA=="}}, 401,
     "unauthorized"),
    ("unknown key", "get", "/v1/models",
     {"headers": {"Authorization": "Bearer bp_000000000000_nope"}}, 401, "unauthorized"),
    ("malformed json", "post", "/v1/plans",
     {"content": b'{"model": ', "headers": {"content-type": "application/json"}}, 400,
     "malformed_json"),
    ("body not an object", "post", "/v1/plans", {"json": [1, 2]}, 422, "invalid_request"),
    ("missing budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen"}}, 422,
     "invalid_request"),
    ("unknown field", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": "1GB", "bits": 3}}, 422, "invalid_request"),
    ("negative budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": -5}},
     422, "invalid_request"),
    ("zero budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": 0}}, 422,
     "invalid_request"),
    ("fractional bytes", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": 1.5}},
     422, "invalid_request"),
    ("budget wrong type", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": {"a": 1}}}, 422, "invalid_request"),
    ("blank budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": "  "}},
     422, "invalid_request"),
    ("garbage budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": "lots"}},
     422, "invalid_budget"),
    ("unknown unit", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": "3 parsecs"}},
     422, "invalid_budget"),
    ("negative string budget", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": "-1GB"}}, 422, "invalid_budget"),
    ("nan budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": "nan"}}, 422,
     "invalid_budget"),
    ("unknown method", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": "1GB", "method": "magic"}}, 422,
     "invalid_request"),
    ("empty model", "post", "/v1/plans", {"json": {"model": "", "budget": "1GB"}}, 422,
     "invalid_request"),
    ("unknown model", "post", "/v1/plans", {"json": {"model": "no-such-model", "budget": "1GB"}},
     404, "model_not_found"),
    ("dotdot escape", "post", "/v1/plans",
     {"json": {"model": "../../etc", "budget": "1GB"}}, 422, "invalid_model"),
    ("absolute path outside roots", "post", "/v1/plans",
     {"json": {"model": "/etc", "budget": "1GB"}}, 422, "invalid_model"),
    ("unknown plan", "get", "/v1/plans/0123", {}, 404, "not_found"),
    ("unknown job", "get", "/v1/jobs/0123", {}, 404, "not_found"),
    ("unknown model id", "get", "/v1/models/0123/feasibility", {}, 404, "not_found"),
    ("unknown artifact", "get", "/v1/artifacts/0123", {}, 404, "not_found"),
    ("unknown route", "get", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "delete", "/v1/plans", {}, 405, "method_not_allowed"),
    ("bad list limit", "get", "/v1/jobs?limit=0", {}, 422, "invalid_request"),
    ("bad status filter", "get", "/v1/jobs?status=weird", {}, 422, "invalid_request"),
    ("blank idempotency key", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": "1GB"}, "headers": {"Idempotency-Key": " "}},
     422, "invalid_request"),
    ("oversized body", "post", "/v1/plans",
     {"json": {"model": "tiny-qwen", "budget": "1GB", "constraints": {"x": "a" * 2_000_000}}},
     413, "payload_too_large"),
]


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory, model_root, tiny_model):
    from service.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp("api-errors")
    url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
    upgrade(url)
    return make_env(make_settings(tmp, url, model_roots=[model_root]), queue=RecordingQueue())


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_clear_4xx(shared_env, case):
    _, method, path, kwargs, status, code = case
    env = shared_env
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", None)
    if headers is None or "Authorization" not in headers:
        headers = (headers or {}) | ({} if case[0] == "no key" else env.h("alpha"))
    r = getattr(env.client, method)(path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


def test_symlink_escape_refused(tmp_path, sqlite_url, model_root, tiny_model):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = model_root / "escape-link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    env = make_env(make_settings(tmp_path, sqlite_url, model_roots=[model_root]),
                   queue=RecordingQueue())
    r = env.client.post("/v1/plans", json={"model": "escape-link", "budget": "1GB"},
                        headers=env.h("alpha"))
    assert r.status_code == 422 and "outside" in r.json()["error"]["message"]


def test_shared_profile_job_and_team_isolation(env):
    a = _plan(env, "alpha")
    assert a.status_code == 202, a.text
    a = a.json()
    assert a["profile_job_id"] and a["links"]["job"] == f"/v1/jobs/{a['job_id']}"
    b = _plan(env, "beta", budget="0.85x").json()
    # one profile job for the model, shared by both teams; each team has its own plan job
    assert b["profile_job_id"] == a["profile_job_id"]
    assert env.queue.sent == [("bitplan.profile", a["profile_job_id"])]
    with env.db.session() as s:
        model_ids = s.scalars(sa.select(ModelRow.id).where(ModelRow.ref == "tiny-qwen")).all()
        assert len(model_ids) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)
                        .where(Job.kind == "profile", Job.model_id == model_ids[0])) == 1
    # a waiting plan job shows its profile's stage
    job = env.client.get(f"/v1/jobs/{a['job_id']}", headers=env.h("alpha")).json()
    assert job["status"] == "queued" and job["waiting_on"] == a["profile_job_id"]
    assert job["stage"] == "waiting for profile" and 0.0 <= job["progress"] <= 1.0
    # isolation: beta sees neither alpha's plan nor its plan job; both see the shared profile job
    for path in (f"/v1/plans/{a['plan_id']}", f"/v1/jobs/{a['job_id']}",
                 f"/v1/plans/{a['plan_id']}/recipe.yaml", f"/v1/plans/{a['plan_id']}/frontier"):
        r = env.client.get(path, headers=env.h("beta"))
        assert r.status_code == 404, (path, r.text)
    for team, mine in (("alpha", a), ("beta", b)):
        plans = env.client.get("/v1/plans", headers=env.h(team)).json()
        jobs = env.client.get("/v1/jobs", headers=env.h(team)).json()
        assert [p["id"] for p in plans] == [mine["plan_id"]]
        assert [j["id"] for j in jobs] == [mine["job_id"]]
    r = env.client.post(f"/v1/plans/{a['plan_id']}/compress", headers=env.h("beta"))
    assert r.status_code == 404
    for team in ("alpha", "beta"):
        r = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h(team))
        assert r.status_code == 200 and r.json()["kind"] == "profile"
    plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
    assert plan["status"] == "pending" and plan["model"]["ref"] == "tiny-qwen"
    r = env.client.get(f"/v1/plans/{a['plan_id']}/recipe.yaml", headers=env.h("alpha"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "plan_not_ready"
    models = env.client.get("/v1/models", headers=env.h("beta")).json()
    tiny = [m for m in models if m["ref"] == "tiny-qwen"]
    assert len(tiny) == 1 and not tiny[0]["profiled"]


def test_idempotency_keys(env):
    k = {"Idempotency-Key": "req-1"}
    body = {"model": "tiny-qwen", "budget": "0.9x"}
    first = env.client.post("/v1/plans", json=body, headers=env.h("alpha") | k)
    again = env.client.post("/v1/plans", json=body, headers=env.h("alpha") | k)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["plan_id"] == first.json()["plan_id"]
    assert again.json()["job_id"] == first.json()["job_id"]
    other = env.client.post("/v1/plans", json=body | {"budget": "0.8x"},
                            headers=env.h("alpha") | k)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # keys are per team: the same key from another team is a new request
    beta = env.client.post("/v1/plans", json=body, headers=env.h("beta") | k)
    assert beta.status_code == 202 and beta.json()["plan_id"] != first.json()["plan_id"]
    with env.db.session() as s:
        n = s.scalar(sa.select(sa.func.count()).select_from(PlanRow)
                     .where(PlanRow.id.in_([first.json()["plan_id"], beta.json()["plan_id"]])))
        teams = s.scalars(sa.select(Job.team_id).where(Job.idempotency_key == "req-1")).all()
    assert n == 2 and len(teams) == len(set(teams)) >= 2


def test_revoked_key_stops_at_once(env):
    assert env.client.get("/v1/models", headers=env.h("alpha")).status_code == 200
    with env.db.session() as s:
        assert revoke_key(s, env.keys["alpha"]) == 1
    r = env.client.get("/v1/models", headers=env.h("alpha"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_feasibility_from_inventory(env):
    from solver.bytes import Option, fp16_bytes, option_bytes

    r = env.client.post("/v1/models", json={"model": "tiny-qwen"}, headers=env.h("alpha"))
    assert r.status_code == 201, r.text
    model = r.json()
    f = env.client.get(f"/v1/models/{model['id']}/feasibility", headers=env.h("alpha")).json()
    with env.db.session() as s:
        inv = s.get(ModelRow, model["id"]).inventory
    shapes = [(li["out_features"], li["in_features"]) for li in inv["linears"]]
    kept = sum(k["nbytes"] for k in inv["kept"])
    # 2 blocks × 7 linears and the tied embedding, planned like them
    assert len(shapes) == 2 * 7 + 1 and f["source"] == "inventory"
    assert inv["linears"][0]["kind"] == "tied"
    assert f["min_bytes"] == kept + sum(option_bytes(m, n, Option(2)) for m, n in shapes)
    assert f["max_bytes"] == kept + sum(fp16_bytes(m, n) for m, n in shapes)
    r = env.client.get(f"/v1/models/{model['id']}/profile", headers=env.h("alpha"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_profiled"


def test_health_and_docs(env):
    assert env.client.get("/healthz").json() == {"status": "ok"}
    r = env.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "queue": "ok"}
    spec = env.client.get("/openapi.json").json()
    assert "/v1/plans" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert env.client.get("/docs").status_code == 200
