"""A team lead's admin over the JSON API: keys (list, create once, revoke — own team only),
cancel (queued jobs never start; shared profile jobs are not one team's to cancel), delete
plans, and GET /v1/status from the jobs table and worker heartbeats."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service.db.models import Job, WorkerRow, utcnow
from service.jobs import state
from service.jobs.workers import beat
from tests.helpers.api import RecordingQueue, make_env, make_settings


def _env(tmp_path, sqlite_url, model_root):
    return make_env(make_settings(tmp_path, sqlite_url, model_roots=[model_root]),
                    queue=RecordingQueue())


def test_keys_list_create_revoke_own_team_only(tmp_path, sqlite_url, model_root):
    env = _env(tmp_path, sqlite_url, model_root)
    c, a, b = env.client, env.h("alpha"), env.h("beta")
    keys = c.get("/v1/keys", headers=a).json()
    assert len(keys) == 1 and "key" not in keys[0] and "secret_hash" not in keys[0]
    made = c.post("/v1/keys", json={"label": "ci"}, headers=a)
    assert made.status_code == 201 and made.json()["key"].startswith("bp_")
    new = {"Authorization": f"Bearer {made.json()['key']}"}
    assert c.get("/v1/models", headers=new).status_code == 200
    listed = c.get("/v1/keys", headers=a).json()
    assert [k["label"] for k in listed] == ["ci", None] and "key" not in listed[0]
    assert c.get("/v1/keys", headers=b).json()[0]["id"] not in {k["id"] for k in listed}
    # another team's key is as unknown as a missing one
    assert c.delete(f"/v1/keys/{made.json()['id']}", headers=b).status_code == 404
    assert c.delete(f"/v1/keys/{made.json()['key_id']}", headers=a).status_code == 204
    assert c.get("/v1/models", headers=new).status_code == 401
    assert c.get("/v1/keys", headers=a).json()[0]["revoked_at"] is not None


def test_cancel_and_delete(tmp_path, sqlite_url, model_root, tiny_model):
    env = _env(tmp_path, sqlite_url, model_root)
    c, a, b = env.client, env.h("alpha"), env.h("beta")
    acc = c.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"}, headers=a).json()
    assert c.post(f"/v1/jobs/{acc['job_id']}/cancel", headers=b).status_code == 404
    shared = c.post(f"/v1/jobs/{acc['profile_job_id']}/cancel", headers=a)
    assert shared.status_code == 409 and shared.json()["error"]["code"] == "shared_job"
    r = c.post(f"/v1/jobs/{acc['job_id']}/cancel", headers=a)
    assert r.status_code == 200 and r.json() == {"job_id": acc["job_id"], "status": "cancelled",
                                                 "was": "queued"}
    job = c.get(f"/v1/jobs/{acc['job_id']}", headers=a).json()
    assert job["status"] == "cancelled" and job["history"][-1][0] == "cancelled"
    assert state.claim(env.db, acc["job_id"], "solve") is None        # never starts
    again = c.post(f"/v1/jobs/{acc['job_id']}/cancel", headers=a)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    # a cancelled job does not count against the team's limit
    assert c.get("/v1/status", headers=a).json()["queues"]["cpu"]["mine_queued"] == 0

    assert c.delete(f"/v1/plans/{acc['plan_id']}", headers=b).status_code == 404
    assert c.delete(f"/v1/plans/{acc['plan_id']}", headers=a).status_code == 204
    assert c.get(f"/v1/plans/{acc['plan_id']}", headers=a).status_code == 404
    assert c.delete(f"/v1/plans/{acc['plan_id']}", headers=a).status_code == 404
    assert c.delete("/v1/artifacts/nope", headers=a).status_code == 404


def test_status_counts_queues_and_recent_workers(tmp_path, sqlite_url, model_root, tiny_model):
    env = _env(tmp_path, sqlite_url, model_root)
    c, a, b = env.client, env.h("alpha"), env.h("beta")
    c.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"}, headers=a)
    c.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.9x"}, headers=b)
    beat(env.db, "gpu-box:1:celery", "celery", ["gpu"])
    beat(env.db, "old-box:2:celery", "celery", ["cpu"])
    with env.db.session() as s:    # a worker whose last beat is long gone
        s.execute(update(WorkerRow).where(WorkerRow.id == "old-box:2:celery")
                  .values(seen_at=utcnow() - timedelta(minutes=10)))
    st = c.get("/v1/status", headers=a).json()
    # two plan jobs (cpu) wait on one shared profile job (gpu)
    assert st["queues"]["cpu"] == {"queued": 2, "running": 0, "mine_queued": 1,
                                   "mine_running": 0}
    assert st["queues"]["gpu"] == {"queued": 1, "running": 0, "mine_queued": 0,
                                   "mine_running": 0}
    assert [w["id"] for w in st["workers"]] == ["gpu-box:1:celery"]
    assert st["workers"][0]["queues"] == ["gpu"] and st["workers"][0]["age_s"] < 5
    with env.db.session() as s:
        s.execute(update(Job).where(Job.team_id.is_(None)).values(status="running"))
    assert c.get("/v1/status", headers=a).json()["queues"]["gpu"]["running"] == 1
    assert c.get("/v1/status").status_code == 401
