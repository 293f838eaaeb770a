"""Cancelling a running compress job: it stops at its next linear (the per-linear progress
report), the runner records it as cancelled, no artifact is left ready and its files are gone;
compressing again starts a fresh job that resumes from the linears already done."""

from __future__ import annotations

from pathlib import Path

import pytest

import compressor.pipeline.execute as cc  # the streamed compression decomposes through here
from service.db.models import Artifact, Job
from service.jobs import state
from service.jobs.registry import Task
from service.jobs.runner import run_task
from service.jobs.stages import compress as compress_stage
from service.jobs.submit import request_compress
from tests.helpers.api import RecordingQueue, make_env, make_settings
from tests.helpers.flow import poll_job
from tests.helpers.profiles import TINY_PROFILE


@pytest.mark.slow   # a real profile, solve and two compress runs of the tiny model (~35 s)
def test_cancel_stops_running_compress_at_next_linear(tmp_path, sqlite_url, model_root,
                                                      tiny_model, monkeypatch):
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    env = make_env(settings)
    try:
        a = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.85x"},
                            headers=env.h("alpha")).json()
        assert poll_job(env, a["job_id"], "alpha", 240)[0]["status"] == "succeeded"
        with env.db.session() as s:
            team_id = s.get(Job, a["job_id"]).team_id
        queue = RecordingQueue()      # this test runs the compress job itself
        art_id, job_id = request_compress(env.db, queue, team_id, a["plan_id"], settings)
        calls: list[str] = []
        real = cc.decompose

        def cancelling(W, H, option, config=None):
            calls.append(option)
            if len(calls) == 3:       # the team cancels while the third linear decomposes
                r = env.client.post(f"/v1/jobs/{job_id}/cancel", headers=env.h("alpha"))
                assert r.json()["was"] == "running"
            return real(W, H, option, config)

        monkeypatch.setattr(cc, "decompose", cancelling)
        assert run_task(Task.COMPRESS, job_id, settings, queue) == "cancelled"
        assert len(calls) == 3                        # stopped at the next linear
        with env.db.session() as s:
            job, art = s.get(Job, job_id), s.get(Artifact, art_id)
            assert job.status == "cancelled" and job.dedup_key is None
            assert art.status == "pending" and art.path is None
        root = Path(settings.data_dir) / "artifacts"
        assert not (root / art_id).exists()
        assert len(list((root / f"{art_id}.partial" / "linears").glob("*.json"))) == 3

        # asked again: a fresh job on the same artifact, resuming the three done linears
        monkeypatch.setattr(cc, "decompose",
                            lambda W, H, o, cfg=None: calls.append(o) or real(W, H, o, cfg))
        art2, job2 = request_compress(env.db, queue, team_id, a["plan_id"], settings)
        assert art2 == art_id and job2 != job_id and queue.sent[-1] == (Task.COMPRESS, job2)

        # cancelled at the last moment (after the stage's last check, before the artifact is
        # marked ready): the artifact never shows ready and its files go
        real_check = compress_stage.check_cancelled

        def cancel_right_after(db, jid):
            real_check(db, jid)
            state.cancel(db, jid)
        monkeypatch.setattr(compress_stage, "check_cancelled", cancel_right_after)
        assert run_task(Task.COMPRESS, job2, settings, queue) == "cancelled"
        assert len(calls) == 15                       # the other 12 (the embedding too), kept
        with env.db.session() as s:
            assert s.get(Artifact, art_id).status == "pending"
        assert not (root / art_id).exists()
        monkeypatch.setattr(compress_stage, "check_cancelled", real_check)

        art3, job3 = request_compress(env.db, queue, team_id, a["plan_id"], settings)
        assert art3 == art_id and job3 not in (job_id, job2)
        assert run_task(Task.COMPRESS, job3, settings, queue) == "succeeded"
        assert len(calls) == 15                       # every linear resumed from the store
        art = env.client.get(f"/v1/artifacts/{art_id}", headers=env.h("alpha")).json()
        assert art["status"] == "ready"
        assert art["metrics"]["artifact_tensor_bytes"] == art["metrics"]["planned_bytes"]
        with env.db.session() as s:   # the cancelled job stays cancelled in the history
            assert s.get(Job, job_id).status == "cancelled"
        assert state.cancel(env.db, job_id) == "cancelled"   # cancelling again: a no-op
    finally:
        env.queue.close()
