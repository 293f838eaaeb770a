"""The end-to-end plan flow, shared by the Celery/Postgres and in-process/SQLite tests:
POST /v1/plans → profile → fit → solve → done, polled through GET /v1/jobs/{id}; a second team
reuses the profile; a third request is solved from the cached profile; redelivered tasks leave
no duplicate rows."""

from __future__ import annotations

import time

import sqlalchemy as sa

from service.db.models import (
    ErrorModel,
    ErrorSamples,
    Job,
    LinearSensitivity,
    ModelRow,
    PlanRow,
    ProfileRow,
)

TERMINAL = ("succeeded", "failed")


def poll_job(env, job_id: str, team: str, timeout: float) -> tuple[dict, list[str]]:
    """Poll until the job ends; returns the final body and every stage seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = env.client.get(f"/v1/jobs/{job_id}", headers=env.h(team))
        assert r.status_code == 200, r.text
        body = r.json()
        assert 0.0 <= body["progress"] <= 1.0
        if not seen or seen[-1] != body["stage"]:
            seen.append(body["stage"])
        if body["status"] in TERMINAL:
            return body, seen
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {seen[-1:]} after {timeout}s")


def row_counts(db, model_id: str) -> dict[str, int]:
    with db.session() as s:
        pids = s.scalars(sa.select(ProfileRow.id).where(ProfileRow.model_id == model_id)).all()

        def n(table, *where):
            return s.scalar(sa.select(sa.func.count()).select_from(table).where(*where))

        return {"profiles": len(pids),
                "sensitivities": n(LinearSensitivity, LinearSensitivity.profile_id.in_(pids)),
                "samples": n(ErrorSamples, ErrorSamples.profile_id.in_(pids)),
                "error_models": n(ErrorModel, ErrorModel.profile_id.in_(pids)),
                "plans": n(PlanRow, PlanRow.model_id == model_id),
                "jobs": n(Job, Job.model_id == model_id),
                "profile_jobs": n(Job, Job.model_id == model_id, Job.kind == "profile")}


def run_plan_flow(env, model_ref: str, timeout: float, settle, crash_redelivery: bool = True
                  ) -> dict:
    """`settle()` waits until the queue has drained what was sent to it. `crash_redelivery`
    also re-runs the finished profile task as if its worker had died mid-run (acks_late
    redelivery), which costs one model load."""
    body = {"model": model_ref, "budget": "0.8x"}
    a = env.client.post("/v1/plans", json=body, headers=env.h("alpha"))
    assert a.status_code == 202, a.text
    a = a.json()
    assert a["profile_job_id"], "a fresh model must be profiled first"
    b = env.client.post("/v1/plans", json=body | {"budget": "0.95x"}, headers=env.h("beta"))
    assert b.status_code == 202, b.text
    b = b.json()
    assert b["profile_job_id"] == a["profile_job_id"], "the second team reuses the profile job"

    done, seen = poll_job(env, a["job_id"], "alpha", timeout)
    assert done["status"] == "succeeded", done
    prof_job = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h("alpha")).json()
    assert prof_job["status"] == "succeeded", prof_job
    stages = [h[0] for h in prof_job["history"]] + [h[0] for h in done["history"]]
    pos = -1
    for want in ("profile", "fit", "solve", "done"):     # in this order
        pos = next((i for i, st in enumerate(stages) if i > pos and st.startswith(want)), None)
        assert pos is not None, (want, stages)
    assert seen[-1] == "done"
    done_b, _ = poll_job(env, b["job_id"], "beta", 60)
    assert done_b["status"] == "succeeded", done_b

    plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
    assert plan["status"] == "solved"
    assert plan["total_bytes"] is not None and plan["budget_bytes"] is not None
    assert plan["total_bytes"] <= plan["budget_bytes"]
    with env.db.session() as s:
        model = s.get(ModelRow, plan["model"]["id"])
        n_linears = model.num_linears
    assert len(plan["linears"]) == n_linears
    plan_b = env.client.get(f"/v1/plans/{b['plan_id']}", headers=env.h("beta")).json()
    assert plan_b["profile_id"] == plan["profile_id"]
    assert plan_b["total_bytes"] >= plan["total_bytes"]      # a larger budget buys more bytes
    assert plan_b["predicted_error"] <= plan["predicted_error"] + 1e-12

    r = env.client.get(f"/v1/plans/{a['plan_id']}/recipe.yaml", headers=env.h("alpha"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/yaml")
    assert "pattern_overrides" in r.text or "default" in r.text
    fr = env.client.get(f"/v1/plans/{a['plan_id']}/frontier", headers=env.h("alpha")).json()
    pts = fr["points"]
    assert len(pts) >= 2 and all(p["bytes"] >= 0 for p in pts)
    by = sorted(pts, key=lambda p: p["bytes"])
    assert all(x["error"] >= y["error"] - 1e-12 for x, y in zip(by, by[1:], strict=False))
    png = env.client.get(f"/v1/plans/{a['plan_id']}/plot.png", headers=env.h("alpha"))
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    feas = env.client.get(f"/v1/models/{model.id}/feasibility", headers=env.h("beta")).json()
    assert feas["source"] == "profile" and feas["min_bytes"] < plan["total_bytes"] <= \
        feas["max_bytes"]
    prof = env.client.get(f"/v1/models/{model.id}/profile", headers=env.h("beta")).json()
    assert len(prof["linears"]) == n_linears and prof["complete"]
    assert env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("beta")).status_code == 404

    # cached profile: no profile job, solved directly
    c = env.client.post("/v1/plans", json=body | {"budget": "0.9x"}, headers=env.h("beta"))
    assert c.status_code == 202 and c.json()["profile_job_id"] is None
    done_c, _ = poll_job(env, c.json()["job_id"], "beta", 60)
    assert done_c["status"] == "succeeded", done_c
    bad = env.client.post("/v1/plans", json=body | {"budget": "1KB"}, headers=env.h("beta"))
    assert bad.status_code == 422, bad.text

    settle()
    before = row_counts(env.db, model.id)
    assert before["profiles"] == 1 and before["profile_jobs"] == 1
    assert before["sensitivities"] == before["samples"] == before["error_models"] == n_linears
    # duplicate deliveries of finished tasks are no-ops …
    env.queue.enqueue("bitplan.profile", a["profile_job_id"])
    env.queue.enqueue("bitplan.solve", a["job_id"])
    # … and a redelivery after a "crash" (running, stale heartbeat) re-runs without new rows
    if crash_redelivery:
        with env.db.session() as s:
            job = s.get(Job, a["profile_job_id"])
            job.status, job.heartbeat_at = "running", None
        env.queue.enqueue("bitplan.profile", a["profile_job_id"])
        poll_job(env, a["profile_job_id"], "alpha", timeout)
    settle()
    after = row_counts(env.db, model.id)
    assert after == before, (before, after)
    with env.db.session() as s:
        assert s.get(Job, a["profile_job_id"]).attempts == (2 if crash_redelivery else 1)
    return {"plan": plan, "stages": stages}
