"""The embedded default: SQLite + the in-process queue runs the same flow as Celery/Postgres."""

from __future__ import annotations

from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import row_counts, run_plan_flow
from tests.helpers.profiles import TINY_PROFILE


def test_plan_flow_sqlite_inprocess(tmp_path, sqlite_url, model_root, tiny_model):
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE)
    env = make_env(settings)
    try:
        run_plan_flow(env, "tiny-qwen", timeout=240, settle=lambda: env.queue.wait_idle(120))
    finally:
        env.queue.close()


def test_nan_weights_fail_clearly(tmp_path, sqlite_url, model_root, tiny_nan_model):
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE)
    env = make_env(settings)
    try:
        a = env.client.post("/v1/plans", json={"model": "tiny-nan", "budget": "0.9x"},
                            headers=env.h("alpha")).json()
        assert env.queue.wait_idle(240)
        pj = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h("alpha")).json()
        assert pj["status"] == "failed" and pj["error"]["code"] == "invalid_input", pj
        assert "NaN" in pj["error"]["message"]
        j = env.client.get(f"/v1/jobs/{a['job_id']}", headers=env.h("alpha")).json()
        assert j["status"] == "failed" and j["error"]["code"] == "dependency_failed"
        # no corrupt rows: nothing of the failed profile was stored
        counts = row_counts(env.db, pj["links"]["model"].rsplit("/", 1)[-1])
        assert counts["sensitivities"] == counts["samples"] == counts["error_models"] == 0, \
            counts
    finally:
        env.queue.close()
