"""Profile and fit stages (GPU queue / CPU queue): profile a model once, resumable per linear
through the database store, and check its fitted error models."""

from __future__ import annotations

from compressor import api
from compressor.artifact.gguf_convert import ConversionError, LlamaCppNotFound, check_vocabulary
from compressor.pipeline.profile import ProfileConfig, open_profile
from compressor.pipeline.profile_store import Profile, seed_shipped_profile
from compressor.quant.decomposed import DecompositionConfig
from service.db.models import Job, JobStatus, ModelRow
from service.db.profile_store import DbProfileStore
from service.jobs import state
from service.jobs.context import StageContext, StageResult
from service.jobs.stages import shards
from service.jobs.state import JobFailed
from service.settings import Settings


def profile_config(settings: Settings, target: str = "native") -> ProfileConfig:
    """The operator's ProfileConfig for `target` (part of the profile key: change it, get a new
    profile). The target is the job's (its plan request's), never the operator's."""
    def norm(v: object) -> object:   # JSON lists back to the config's tuples
        return tuple(norm(x) for x in v) if isinstance(v, list) else v

    over = {k: norm(v) for k, v in (settings.profile_config or {}).items()}
    if isinstance(over.get("decomposition"), dict):
        over["decomposition"] = DecompositionConfig.from_dict(over["decomposition"])
    unknown = set(over) - set(ProfileConfig.__dataclass_fields__)
    if unknown:
        raise JobFailed(f"unknown profile_config keys: {sorted(unknown)}", "bad_settings")
    over["target"] = target
    try:
        return ProfileConfig(**over)
    except ValueError as exc:
        raise JobFailed(f"profile_config: {exc}", "bad_settings") from None


def job_target(job: Job) -> str:
    """A profile (or shard) job's target; jobs from before targets are native."""
    return str((job.payload or {}).get("target") or "native")


def fit_summary(profile: Profile) -> dict:
    """Every linear must carry a fitted E_i(b, r); report how well they fit."""
    missing = [lp.name for lp in profile.linears if not lp.fit]
    if missing:
        raise JobFailed(f"{len(missing)} linears lack a fitted error model "
                        f"(first: {missing[0]})", "fit_missing")
    r2 = [v for lp in profile.linears for k, v in lp.fit.items()
          if k in ("r2_heldout", "r2_fit", "r2") and isinstance(v, int | float)]
    return {"linears": len(profile.linears), "fitted": len(profile.linears),
            "fit_r2_mean": round(sum(r2) / len(r2), 4) if r2 else None}


def profile_stage(ctx: StageContext) -> StageResult:
    """Profile the job's model: in one sweep, or split into block-range shards on several
    workers (service.jobs.stages.shards) — this task then runs again as the shards' chord body
    and assembles their records."""
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        model = s.get(ModelRow, job.model_id) if job.model_id else None
        target = job_target(job)
    if model is None:
        raise JobFailed("profile job has no model", "invalid_job")
    store = DbProfileStore(ctx.db)
    settings = ctx.settings
    cfg = profile_config(settings, target)

    def progress(stage: str, frac: float) -> None:   # load/linears/blocks → profile/…
        if stage != "done":
            ctx.report(f"profile/{stage}", 0.95 * frac)

    ctx.report("profile", 0.0)
    if target == "gguf":   # a tokenizer llama.cpp's converter refuses fails now, not at compress
        try:
            check_vocabulary(model.path)
        except (LlamaCppNotFound, ConversionError) as exc:
            raise JobFailed(str(exc), "gguf_unavailable" if isinstance(exc, LlamaCppNotFound)
                            else "gguf_conversion") from None
    seed_shipped_profile(store, model.path)
    shard_jobs = state.children(ctx.db, ctx.job_id)
    src = open_profile(model.path, cfg, device=settings.device,
                       trust_remote_code=settings.trust_remote_code,
                       weights_hash=shard_jobs[0].payload.get("weights_hash") if shard_jobs
                       else None)
    profile = store.get(src.key)
    if profile is None and shard_jobs:
        gone = shards.missing(ctx, src, shard_jobs)
        if gone or any(j.status != JobStatus.SUCCEEDED for j in shard_jobs):
            return shards.dispatch(ctx, shard_jobs, rerun=gone)
        ctx.report("profile/assemble", 0.95)
        profile = shards.assemble(ctx, src, shard_jobs)
    elif profile is None and (n := shards.shard_count(ctx, src.sm.num_blocks)) > 1:
        shards.create_shards(ctx, src, model, n)
        return shards.dispatch(ctx, state.children(ctx.db, ctx.job_id))
    elif profile is None:
        profile = api.profile(model.path, cfg, store=store, progress=progress, source=src)
    ctx.report("fit", 0.96)
    profile_id = store.link_model(profile.key, model.id)
    with ctx.db.session() as s:
        row = s.get(ModelRow, model.id)
        if row is not None and profile.weights_hash:
            row.weights_hash = profile.weights_hash
    # time per stage and peak memory of the run that measured it (absent from a profile that
    # was already stored, e.g. the demo's shipped one)
    measured = {k: profile.stats[k] for k in ("stage_s", "peak_rss_bytes", "peak_gpu_bytes",
                                              "shards") if k in profile.stats}
    return StageResult(result={"profile_id": profile_id, "profile_key": profile.key}
                       | fit_summary(profile) | measured, links={"profile_id": profile_id})


def shard_stage(ctx: StageContext) -> StageResult:
    """One block range of a sharded profile (service.jobs.stages.shards)."""
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        target = job_target(job) if job is not None else "native"
    return shards.run_shard(ctx, profile_config(ctx.settings, target))


def fit_stage(ctx: StageContext) -> StageResult:
    with ctx.db.session() as s:
        profile_id = s.get(Job, ctx.job_id).profile_id
    if not profile_id:
        raise JobFailed("fit job has no profile", "invalid_job")
    profile = DbProfileStore(ctx.db).get_by_id(profile_id)
    if profile is None:
        raise JobFailed(f"profile {profile_id} is not complete", "invalid_job")
    return StageResult(result=fit_summary(profile))
