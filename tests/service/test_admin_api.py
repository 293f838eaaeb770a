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


def test_status_counts_queues_and_recent_workers(tmp_path, db_url, model_root, tiny_model):
    env = _env(tmp_path, db_url, model_root)
    c, a, b = env.client, env.h("alpha"), env.h("beta")
    before = c.get("/v1/status", headers=a).json()["queues"]   # a shared Postgres may hold more
    acc = c.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"}, headers=a).json()
    c.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.9x"}, headers=b)
    beat(env.db, "gpu-box:1:celery", "celery", ["gpu"])
    beat(env.db, "old-box:2:celery", "celery", ["cpu"])
    with env.db.session() as s:    # a worker whose last beat is long gone
        s.execute(update(WorkerRow).where(WorkerRow.id == "old-box:2:celery")
                  .values(seen_at=utcnow() - timedelta(minutes=10)))
    st = c.get("/v1/status", headers=a).json()

    def grew(q: str) -> dict:
        return {k: st["queues"][q][k] - before[q][k] for k in before[q]}

    # two plan jobs (cpu), one per team, wait on one shared profile job (gpu) — unless the
    # shared database already had this model's profile job
    assert grew("cpu") == {"queued": 2, "running": 0, "mine_queued": 1, "mine_running": 0}
    assert grew("gpu")["queued"] in (0, 1) and grew("gpu")["mine_queued"] == 0
    ids = [w["id"] for w in st["workers"]]
    assert "gpu-box:1:celery" in ids and "old-box:2:celery" not in ids
    mine = next(w for w in st["workers"] if w["id"] == "gpu-box:1:celery")
    assert mine["queues"] == ["gpu"] and mine["age_s"] < 5
    running = st["queues"]["gpu"]["running"]
    with env.db.session() as s:
        n = s.execute(update(Job).where(Job.id == acc["profile_job_id"],
                                        Job.status == "queued").values(status="running")).rowcount
    assert c.get("/v1/status", headers=a).json()["queues"]["gpu"]["running"] == running + n
    assert c.get("/v1/status").status_code == 401
