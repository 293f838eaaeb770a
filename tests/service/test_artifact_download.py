"""Artifact downloads: a ready artifact downloads as one tar whose sha256 is the one sent and
recorded, that unpacks into an artifact loading to the same model as the server's copy; per-file
digests are listed; not-ready is 409, another team's is 404; rows holding the old one-file
digest get the archive digest on first download."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from service.db.models import Artifact, PlanRow
from service.jobs.submit import ensure_compress_job
from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import poll_job
from tests.helpers.profiles import TINY_PROFILE


def _solved_plan(env, team: str, budget: str) -> str:
    r = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": budget},
                        headers=env.h(team))
    assert r.status_code == 202, r.text
    assert poll_job(env, r.json()["job_id"], team, 240)[0]["status"] == "succeeded"
    return r.json()["plan_id"]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def test_download_verifies_unpacks_and_loads(tmp_path, sqlite_url, model_root, tiny_model):
    import torch

    from compressor.artifact.native import load_compressed, read_manifest

    settings = make_settings(tmp_path / "data", sqlite_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE, eval_seqs=2, eval_seq_len=32)
    env = make_env(settings)
    try:
        plan_id = _solved_plan(env, "alpha", "0.85x")
        c = env.client.post(f"/v1/plans/{plan_id}/compress", headers=env.h("alpha")).json()
        art_id = c["artifact_id"]
        # a pending artifact cannot be downloaded yet (the job runs in the background, so
        # look at one that is certainly pending: a second plan's, never enqueued)
        other_plan = _solved_plan(env, "alpha", "0.9x")
        with env.db.session() as s:
            pending = ensure_compress_job(s, s.get(PlanRow, other_plan)).artifact_id
        for tail in ("download", "files"):
            r = env.client.get(f"/v1/artifacts/{pending}/{tail}", headers=env.h("alpha"))
            assert r.status_code == 409 and r.json()["error"]["code"] == "artifact_not_ready"

        assert poll_job(env, c["job_id"], "alpha", 240)[0]["status"] == "succeeded"
        art = env.client.get(f"/v1/artifacts/{art_id}", headers=env.h("alpha")).json()
        assert art["status"] == "ready" and art["links"]["download"].endswith("/download")

        r = env.client.get(f"/v1/artifacts/{art_id}/download", headers=env.h("alpha"))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-tar"
        body = r.content
        digest = hashlib.sha256(body).hexdigest()
        assert r.headers["x-checksum-sha256"] == digest == art["sha256"]
        assert int(r.headers["content-length"]) == len(body)
        again = env.client.get(f"/v1/artifacts/{art_id}/download", headers=env.h("alpha"))
        assert again.content == body                    # the same artifact, the same bytes

        out = tmp_path / "unpacked"
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            tar.extractall(out, filter="data")
        local = out / art_id
        server_dir = Path(settings.data_dir) / "artifacts" / art_id
        assert sorted(p.name for p in local.iterdir()) == \
            sorted(p.name for p in server_dir.iterdir())

        files = env.client.get(f"/v1/artifacts/{art_id}/files", headers=env.h("alpha")).json()
        assert files["archive_sha256"] == digest and files["archive_bytes"] == len(body)
        for f in files["files"]:
            data = (out / f["path"]).read_bytes()
            assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        assert {Path(f["path"]).name for f in files["files"]} >= \
            set(read_manifest(local).files) | {"bitplan_manifest.json"}

        mine, _ = load_compressed(local)                # verifies every file's sha256 too
        theirs, _ = load_compressed(server_dir)
        ids = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(_logits(mine, ids), _logits(theirs, ids))

        # another team sees nothing
        for tail in ("download", "files"):
            r = env.client.get(f"/v1/artifacts/{art_id}/{tail}", headers=env.h("beta"))
            assert r.status_code == 404

        # a row from before archives held the digest of compressed.safetensors: the first
        # download records the archive's digest instead
        old = read_manifest(server_dir).files["compressed.safetensors"]
        with env.db.session() as s:
            s.get(Artifact, art_id).sha256 = old
        r = env.client.get(f"/v1/artifacts/{art_id}/download", headers=env.h("alpha"))
        assert r.headers["x-checksum-sha256"] == digest and r.content == body
        with env.db.session() as s:
            assert s.get(Artifact, art_id).sha256 == digest

        # a recorded path outside the data dir is never served
        with env.db.session() as s:
            s.get(Artifact, art_id).path = str(tiny_model)
        r = env.client.get(f"/v1/artifacts/{art_id}/download", headers=env.h("alpha"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    finally:
        env.queue.close()
