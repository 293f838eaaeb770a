"""Compress stage (GPU queue): execute a solved plan (compressor.api.compress), save the artifact,
measure it, and store predicted and measured side by side.

Layer-resumable: every finished linear is written to the job's work directory
(<data_dir>/artifacts/<artifact id>.partial/) before the next starts; a redelivered job loads
those and decomposes only the rest. The artifact itself is written atomically by the ArtifactWriter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

import solver
from compressor import api
from compressor.artifact.archive import archive_sha256
from compressor.artifact.gguf_convert import ConversionError, LlamaCppNotFound
from compressor.pipeline.execute import DirCompressStore, ExecuteConfig, Executed
from service.db.models import Artifact, ArtifactStatus, Job, JobStatus, ModelRow, PlanRow, utcnow
from service.db.profile_store import DbProfileStore
from service.db.session import serialize_on
from service.jobs.context import StageContext, StageResult
from service.jobs.state import JobCancelled, JobFailed, check_cancelled


def compress_stage(ctx: StageContext) -> StageResult:
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        plan_row = s.get(PlanRow, job.plan_id) if job.plan_id else None
        model_row = s.get(ModelRow, plan_row.model_id) if plan_row else None
        art = s.get(Artifact, job.artifact_id) if job.artifact_id else None
        if plan_row is None or model_row is None or art is None or not plan_row.result:
            raise JobFailed("compress job needs a solved plan and its artifact row",
                            "invalid_job")
        plan = solver.Plan.from_dict(plan_row.result)
        profile_id, model_path, art_id = plan_row.profile_id, model_row.path, art.id
    profile = DbProfileStore(ctx.db).get_by_id(profile_id)
    if profile is None:
        raise JobFailed("the plan's profile is missing", "profile_missing")
    settings = ctx.settings
    root = Path(settings.data_dir) / "artifacts"
    store = DirCompressStore(root / f"{art_id}.partial")
    config = ExecuteConfig(device=settings.device, trust_remote_code=settings.trust_remote_code,
                           eval_seq_len=settings.eval_seq_len, eval_seqs=settings.eval_seqs)

    def progress(stage: str, frac: float) -> None:
        if stage == "linears":
            ctx.report("compress/linears", 0.05 + 0.8 * frac)
        elif stage == "evaluate":
            ctx.report("evaluate", 0.9)
        else:
            ctx.report(f"compress/{stage}", {"load": 0.02, "save": 0.86}.get(stage, 0.0))

    try:
        try:
            done = api.compress(model_path, profile, plan, root / art_id, config=config,
                                store=store, progress=progress)
        except (LlamaCppNotFound, ConversionError) as exc:   # target gguf: llama.cpp's part
            raise JobFailed(str(exc), "gguf_unavailable" if isinstance(exc, LlamaCppNotFound)
                            else "gguf_conversion") from None
        # the digest of the one download (the artifact's deterministic tar), not of one file;
        # read before the transaction opens, so no session is held while GBs are hashed
        digest, _ = archive_sha256(artifact_dir(done))
        check_cancelled(ctx.db, ctx.job_id)   # cancelled while saving or measuring
        with ctx.db.session() as s:
            # under the job's lock (as `state.cancel` takes it): a cancel either lands before
            # this and the artifact never shows ready, or after it, on a finished artifact
            serialize_on(s, Job.id, ctx.job_id)
            if s.scalar(select(Job.status).where(Job.id == ctx.job_id)) == JobStatus.CANCELLED:
                raise JobCancelled(f"job {ctx.job_id} was cancelled")
            _mark_ready(s.get(Artifact, art_id), done, digest)
    except JobCancelled:
        # nothing half-written stays: the artifact row stays pending and its files go; the
        # per-linear work stays in the store, so compressing again resumes from it
        shutil.rmtree(root / art_id, ignore_errors=True)
        raise
    store.clear()
    return StageResult(result=done.metrics | {"artifact_id": art_id},
                       links={"artifact_id": art_id, "plan_id": plan_row.id})


def artifact_dir(done: Executed) -> Path:
    """The directory a download archives: the artifact itself (native), or the folder of a
    gguf target's model.gguf (beside it its reference.gguf and tensor-types.txt)."""
    return done.artifact if done.artifact.is_dir() else done.artifact.parent


def _mark_ready(row: Artifact, done: Executed, digest: str) -> None:
    folder = artifact_dir(done)
    row.status = ArtifactStatus.READY
    row.path = str(folder)
    row.bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    row.tensor_bytes = done.tensor_bytes
    row.sha256 = digest
    row.metrics = done.metrics
    row.finished_at = utcnow()
