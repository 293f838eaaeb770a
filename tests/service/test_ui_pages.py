"""The dashboard without a browser (TestClient): sign-in and its cookie, CSRF and Origin checks
on every form, the session cookie reading the JSON API but never changing anything there, team
isolation (404), a bad budget's message on the form, keys created once and revoked."""

from __future__ import annotations

import re

from service.db.models import Job
from tests.helpers.api import RecordingQueue, make_env, make_settings


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html)[1]


def _signed_in(env, team: str):
    env.client.cookies.clear()
    r = env.client.post("/ui/login", data={"api_key": env.keys[team]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/models"
    return r


def test_sign_in_csrf_and_isolation(tmp_path, sqlite_url, model_root, tiny_model):
    env = make_env(make_settings(tmp_path, sqlite_url, model_roots=[model_root]),
                   queue=RecordingQueue())
    c = env.client
    r = c.get("/ui/plans/new", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    bad = c.post("/ui/login", data={"api_key": "bp_x_y"})
    assert bad.status_code == 401 and "unknown or revoked" in bad.text
    cookie = _signed_in(env, "alpha").headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "bp_" not in cookie
    csrf = _csrf(c.get("/ui/plans/new").text)

    # a bad budget: the form again, with the solver's message, and nothing queued
    r = c.post("/ui/plans", data={"csrf": csrf, "model": "tiny-qwen", "budget": "12", "unit": "parsecs"})
    assert r.status_code == 422 and "unknown budget unit" in r.text and 'id="plan-form"' in r.text
    r = c.post("/ui/plans", data={"csrf": csrf, "model": "tiny-qwen", "budget": "0.01", "unit": "x"})
    assert r.status_code == 422 and "below the minimum feasible" in r.text
    assert env.queue.sent == []

    # forms need the session's CSRF token, and a same-site Origin
    body = {"model": "tiny-qwen", "budget": "0.85", "unit": "x"}
    assert c.post("/ui/plans", data=body).status_code == 403
    assert c.post("/ui/plans", data=body | {"csrf": csrf + "x"}).status_code == 403
    assert c.post("/ui/plans", data=body | {"csrf": csrf},
                  headers={"Origin": "https://evil.example"}).status_code == 403
    assert env.queue.sent == []
    r = c.post("/ui/plans", data=body | {"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and env.queue.sent
    plan_id = r.headers["location"].rsplit("/", 1)[1]
    page = c.get(f"/ui/plans/{plan_id}")
    assert page.status_code == 200 and "data-job=" in page.text      # live progress

    # the cookie reads the JSON API (the page's polling), but cannot change anything there
    with env.db.session() as s:
        job_id = s.query(Job.id).filter(Job.plan_id == plan_id).scalar()
    assert c.get(f"/v1/jobs/{job_id}").status_code == 200
    assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    assert c.post("/v1/keys", json={}).status_code == 401

    # team B: A's plan, job and plan JSON are 404, as is A's job cancel through the form
    _signed_in(env, "beta")
    b_csrf = _csrf(c.get("/ui/team").text)
    for url in (f"/ui/plans/{plan_id}", f"/v1/plans/{plan_id}", f"/v1/jobs/{job_id}"):
        assert c.get(url).status_code == 404, url
    assert "Not found" in c.get(f"/ui/plans/{plan_id}").text
    assert c.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": b_csrf}).status_code == 404
    assert c.post(f"/ui/plans/{plan_id}/delete", data={"csrf": b_csrf}).status_code == 404
    assert job_id[:8] not in c.get("/ui/jobs").text

    # A cancels from the jobs page
    _signed_in(env, "alpha")
    a_csrf = _csrf(c.get("/ui/jobs").text)
    r = c.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": a_csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_team_keys_shown_once_and_revoke_ends_session(tmp_path, sqlite_url, model_root):
    env = make_env(make_settings(tmp_path, sqlite_url, model_roots=[model_root]),
                   queue=RecordingQueue())
    c = env.client
    _signed_in(env, "alpha")
    csrf = _csrf(c.get("/ui/team").text)
    r = c.post("/ui/team/keys", data={"csrf": csrf, "label": "laptop"})
    key = re.search(r'id="new-key">(bp_[^<]+)<', r.text)[1]
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    page = c.get("/ui/team").text
    assert key not in page and "laptop" in page                    # shown once only
    # revoking the key this session signed in with signs it out
    assert "this session's" in page
    rows = re.findall(r'action="/ui/team/keys/([0-9a-f]+)/revoke"', page)
    assert len(rows) == 2                                  # the new key and the session's
    assert c.post(f"/ui/team/keys/{rows[0]}/revoke", data={"csrf": csrf},
                  follow_redirects=False).status_code == 303
    assert c.get("/ui/team").status_code == 200            # the other key still signs us in
    c.post(f"/ui/team/keys/{rows[1]}/revoke", data={"csrf": csrf})
    r = c.get("/ui/team", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
