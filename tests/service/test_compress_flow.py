"""Compression jobs: a solved plan is executed into an artifact whose bytes are the planned
bytes, measured (ppl, KL, top-1) beside its prediction; a job killed mid-way resumes without
redoing finished linears and ends with the same result."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.artifact.archive import recorded_file_digests
from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import poll_job
from tests.helpers.profiles import TINY_PROFILE


def _plan_and_compress(env) -> tuple[dict, dict]:
    a = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"},
                        headers=env.h("alpha"))
    assert a.status_code == 202, a.text
    a = a.json()
    done, _ = poll_job(env, a["job_id"], "alpha", 240)
    assert done["status"] == "succeeded", done
    c = env.client.post(f"/v1/plans/{a['plan_id']}/compress", headers=env.h("alpha"))
    assert c.status_code == 202, c.text
    return a, c.json()


def test_compress_job_writes_measured_artifact(tmp_path, sqlite_url, model_root, tiny_model):
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    env = make_env(settings)
    try:
        a, c = _plan_and_compress(env)
        job, seen = poll_job(env, c["job_id"], "alpha", 240)
        assert job["status"] == "succeeded", job
        assert any(st.startswith("compress/linears") for st in seen + [h[0] for h in
                                                                        job["history"]])
        art = env.client.get(f"/v1/artifacts/{c['artifact_id']}", headers=env.h("alpha")).json()
        assert art["status"] == "ready"
        m = art["metrics"]
        plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
        assert m["planned_bytes"] == plan["total_bytes"]
        assert m["artifact_tensor_bytes"] == m["planned_bytes"]     # every byte accounted
        assert m["ppl"] > 1 and m["kl"] >= 0 and 0 <= m["top1"] <= 1
        assert m["predicted_kl"] >= 0
        # team B cannot see team A's artifact
        other = env.client.get(f"/v1/artifacts/{c['artifact_id']}", headers=env.h("beta"))
        assert other.status_code == 404
        # asking again returns the same artifact and job
        again = env.client.post(f"/v1/plans/{a['plan_id']}/compress", headers=env.h("alpha"))
        assert again.json()["artifact_id"] == c["artifact_id"]
    finally:
        env.queue.close()


def test_killed_compress_job_resumes_per_linear(tmp_path, sqlite_url, model_root, tiny_model,
                                                monkeypatch):
    import compressor.pipeline.execute as cc  # execute_plan decomposes block by block

    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    env = make_env(settings)
    calls: list[str] = []
    real = cc.decompose

    class Killed(BaseException):   # like SIGKILL: not an Exception the runner would record
        pass

    def dying(W, H, option, config=None):
        calls.append(option)
        if len(calls) == 5:
            raise Killed
        return real(W, H, option, config)

    try:
        from service.db.models import PlanRow
        from service.jobs.submit import ensure_compress_job

        a = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"},
                            headers=env.h("alpha")).json()
        assert poll_job(env, a["job_id"], "alpha", 240)[0]["status"] == "succeeded"
        with env.db.session() as s:   # a compress job, run here by hand instead of the queue
            job = ensure_compress_job(s, s.get(PlanRow, a["plan_id"]))
            c = {"job_id": job.id, "artifact_id": job.artifact_id}
        monkeypatch.setattr(cc, "decompose", dying)
        with pytest.raises(Killed):
            from service.jobs.context import StageContext
            from service.jobs.stages.compress import compress_stage

            ctx = StageContext(env.db, settings, c["job_id"], None, lambda st, f: None)
            compress_stage(ctx)
        partial = Path(settings.data_dir) / "artifacts" / f"{c['artifact_id']}.partial"
        assert len(list((partial / "linears").glob("*.json"))) == 4
        monkeypatch.setattr(cc, "decompose", real)
        counted: list[str] = []
        monkeypatch.setattr(cc, "decompose",
                            lambda W, H, o, cfg=None: counted.append(o) or real(W, H, o, cfg))
        result = compress_stage(ctx)
        assert len(counted) == 15 - 4              # only the unfinished ones (embedding included)
        assert not partial.exists()
        m = result.result
        assert m["artifact_tensor_bytes"] == m["planned_bytes"]
        # the same bytes as a run that was never interrupted (another team's identical plan)
        from service.db.models import Artifact

        b = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"},
                            headers=env.h("beta")).json()
        assert poll_job(env, b["job_id"], "beta", 240)[0]["status"] == "succeeded"
        with env.db.session() as s:
            job_b = ensure_compress_job(s, s.get(PlanRow, b["plan_id"]))
            ids = (job_b.id, job_b.artifact_id)
        compress_stage(StageContext(env.db, settings, ids[0], None, lambda st, f: None))
        with env.db.session() as s:
            art_a, art_b = s.get(Artifact, c["artifact_id"]), s.get(Artifact, ids[1])
            # the recorded digests are of each download (its tar names the artifact and its
            # manifest has a timestamp); the tensor files themselves are identical
            assert art_a.sha256 and art_b.sha256
            a_files, b_files = (recorded_file_digests(x.path) for x in (art_a, art_b))
            assert a_files["compressed.safetensors"] == b_files["compressed.safetensors"]
            assert a_files["kept.safetensors"] == b_files["kept.safetensors"]
            assert art_a.metrics["kl"] == pytest.approx(art_b.metrics["kl"], rel=1e-6)
    finally:
        env.queue.close()
