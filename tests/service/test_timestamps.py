"""Every time the API shows (and the database returns) is timezone-aware UTC, on SQLite (which
stores no time zone) as on Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from service.db.models import Job, PlanRow
from tests.helpers.api import RecordingQueue, make_env, make_settings


def _assert_utc(value: str, where: str) -> None:
    t = datetime.fromisoformat(value)
    assert t.utcoffset() == timedelta(0), f"{where}: {value!r} has no UTC offset"


def test_api_and_db_datetimes_are_aware_utc(tmp_path, db_url, model_root, tiny_model):
    env = make_env(make_settings(tmp_path, db_url, model_roots=[model_root]),
                   queue=RecordingQueue())
    r = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.9x"},
                        headers=env.h("alpha"))
    assert r.status_code == 202, r.text
    acc = r.json()
    job = env.client.get(f"/v1/jobs/{acc['job_id']}", headers=env.h("alpha")).json()
    plan = env.client.get(f"/v1/plans/{acc['plan_id']}", headers=env.h("alpha")).json()
    checked = 0
    for name, body in (("job", job), ("plan", plan)):
        for key, value in body.items():
            if key.endswith("_at") and value is not None:
                _assert_utc(value, f"{name}.{key}")
                checked += 1
    for stage, at in job["history"]:
        _assert_utc(at, f"job.history[{stage}]")
    assert checked >= 3           # job created/updated, plan created
    with env.db.session() as s:   # what the ORM hands back, not only what the API renders
        row = s.get(Job, acc["job_id"])
        plan_row = s.get(PlanRow, acc["plan_id"])
        n_old = s.scalar(sa.select(sa.func.count()).select_from(Job).where(
            Job.created_at <= datetime.now().astimezone()))   # an aware non-UTC bind compares
    for t in (row.created_at, row.updated_at, plan_row.created_at):
        assert t.utcoffset() == timedelta(0), t
    assert n_old >= 1
