"""Profile shards (GPU queue): a profile job over L blocks splits into block-range shard jobs
that run on as many workers at once; the profile job assembles their records when all are done.

Each shard streams the blocks before its range forward itself (no shared activation store),
samples its own linears into the shared profile store (resumable per linear, like any profile)
and carries their probes to the head (compressor.pipeline.profile.sweep_blocks), so the assembled profile
equals a one-worker profile. The fan-out is a Celery chord on the `gpu` queue (in embedded mode
the same shards on the in-process pool): header = the shards, body = the profile job's own task,
which then finds every shard done and assembles (`assemble`). Shards are jobs: leases, retries,
sweeper recovery and cancellation are the job machinery's, not a scheduler of ours.
"""

from __future__ import annotations

import math
import time

from sqlalchemy import select

from compressor.checkpoint.memory import StageClock
from compressor.pipeline.profile import (
    ProfileConfig,
    ProfileSource,
    assemble_profile,
    open_profile,
    shard_ranges,
    sweep_blocks,
)
from compressor.pipeline.profile_store import Profile
from service.db.models import Job, JobKind, JobStatus, ModelRow, new_id, utcnow
from service.db.profile_store import DbProfileStore
from service.jobs import state
from service.jobs.context import StageContext, StageResult
from service.jobs.registry import Task
from service.jobs.state import JobFailed
from service.jobs.workers import recent_workers

PARENT_SPAN = (0.05, 0.95)   # of the profile job's progress, the part its shards account for


def shard_count(ctx: StageContext, num_blocks: int) -> int:
    """Shards for a model of `num_blocks` blocks: the setting, or (0) in team mode two per
    `gpu` worker seen alive by its heartbeat when there are several (1 in embedded mode or
    with one worker); never more than the blocks. Two each, because shards are not equal: a
    shard's probes ride through every later block, so early ranges cost more (on the demo, with
    the former 8 probe sequences, 51 s against 23 s for two halves), and with twice as many shards as workers the queue evens
    them out (a worker done early takes the next one) at the price of one more pass over the
    blocks before each extra shard."""
    n = ctx.settings.profile_shards
    if n == 0:
        if not ctx.settings.redis_url:
            return 1
        within = 3 * ctx.settings.worker_heartbeat_s
        workers = sum(1 for w in recent_workers(ctx.db, within)
                      if w.kind == "celery" and "gpu" in (w.queues or []))
        n = 2 * workers if workers > 1 else 1
    return max(1, min(n, num_blocks))


def create_shards(ctx: StageContext, src: ProfileSource, model: ModelRow, n: int) -> list[str]:
    """One queued shard job per block range of `src`'s model; their ids."""
    ids = []
    with ctx.db.session() as s:
        for blocks in shard_ranges(src.sm.num_blocks, n):
            sid = new_id()
            s.add(Job(id=sid, team_id=None, kind=JobKind.PROFILE_SHARD, parent_id=ctx.job_id,
                      model_id=model.id, status=JobStatus.QUEUED, stage="queued",
                      payload={"blocks": [blocks.start, blocks.stop], "profile_key": src.key,
                               "weights_hash": src.weights_hash, "target": src.cfg.target},
                      history=[["queued", utcnow().isoformat()]]))
            ids.append(sid)
    return ids


def missing(ctx: StageContext, src: ProfileSource, shards: list[Job]) -> set[str]:
    """Succeeded shards whose linears' records are not in the store (deleted since)."""
    have = DbProfileStore(ctx.db).linear_records(src.key)
    gone = {li.block for li in src.inventory.linears if li.name not in have}
    return {j.id for j in shards if j.status == JobStatus.SUCCEEDED
            and gone & set(range(*j.payload["blocks"]))}


def dispatch(ctx: StageContext, shards: list[Job], rerun: set[str] = frozenset()) -> StageResult:
    """Park the profile job while its unfinished shards run. Failed or cancelled shards (the
    profile is being retried) and those in `rerun` are queued again; running ones are left to
    their worker (a dead one's lease expires and the sweeper re-sends it); queued ones go out
    in one chord whose body is this job's task."""
    retry = [j.id for j in shards
             if j.status in (JobStatus.FAILED, JobStatus.CANCELLED) or j.id in rerun]
    if retry:
        with ctx.db.session() as s:
            for job in s.scalars(select(Job).where(Job.id.in_(retry))):
                job.status, job.stage, job.error, job.error_code = \
                    JobStatus.QUEUED, "queued", None, None
                job.finished_at, job.updated_at = None, utcnow()
    todo = [j.id for j in shards if j.id in retry or j.status == JobStatus.QUEUED]
    done = sum(j.status == JobStatus.SUCCEEDED and j.id not in retry for j in shards)
    header = [(Task.PROFILE_SHARD.value, sid) for sid in todo]
    return StageResult(waiting=f"profile/shards {done}/{len(shards)} done",
                       fan_out=(header, (Task.PROFILE.value, ctx.job_id)) if header else None)


def assemble(ctx: StageContext, src: ProfileSource, shards: list[Job]) -> Profile:
    """The profile from every shard's records and block influences (each block measured by the
    shard that holds it)."""
    influence = [math.nan] * src.sm.num_blocks
    results = [j.result or {} for j in shards]
    for r in results:
        a, b = r["blocks"]
        influence[a:b] = r["block_influence"]
    stage_s: dict[str, float] = {}
    for r in results:
        for k, v in r.get("stage_s", {}).items():
            stage_s[k] = round(stage_s.get(k, 0.0) + v, 3)
    stats = {"shards": len(shards), "shard_wall_s": [r.get("wall_s") for r in results],
             "wall_s": max(r.get("wall_s", 0.0) for r in results),
             "sampling_s": round(stage_s.get("sampling", 0.0), 2),
             "probe_s": round(stage_s.get("probes", 0.0), 2), "stage_s": stage_s,
             # the largest one process needed: what a worker must have
             "peak_rss_bytes": max(r.get("peak_rss_bytes") or 0 for r in results),
             "peak_gpu_bytes": max(r.get("peak_gpu_bytes") or 0 for r in results)}
    return assemble_profile(src, DbProfileStore(ctx.db), influence, stats)


def run_shard(ctx: StageContext, cfg: ProfileConfig) -> StageResult:
    """Profile the linears of one block range (the shard job's payload) into the shared store."""
    t0 = time.perf_counter()
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        model = s.get(ModelRow, job.model_id) if job.model_id else None
        payload, parent_id = dict(job.payload or {}), job.parent_id
    if model is None or parent_id is None or "blocks" not in payload:
        raise JobFailed("profile shard job has no model, parent or block range", "invalid_job")
    clock = StageClock()
    with clock.stage("load"):
        src = open_profile(model.path, cfg, device=ctx.settings.device,
                           trust_remote_code=ctx.settings.trust_remote_code,
                           weights_hash=payload["weights_hash"])
    if src.key != payload["profile_key"]:
        raise JobFailed("the model's calibration or the profile configuration changed since "
                        "this profile was split; profile it again", "profile_changed")
    blocks = range(*payload["blocks"])
    progress = ParentProgress(ctx, parent_id)
    sweep = sweep_blocks(src.sm, src.calib, src.cfg, src.key, DbProfileStore(ctx.db),
                         src.inventory, blocks, report=progress, clock=clock)
    return StageResult(result={
        "blocks": [blocks.start, blocks.stop],
        "block_influence": [sweep.block_influence[j] for j in blocks],
        "wall_s": round(time.perf_counter() - t0, 2), **clock.report(ctx.settings.device)})


class ParentProgress:
    """A shard's progress callback: its own job's, and every few seconds the profile job's
    (the mean over its shards), which is what a client waiting on the profile sees."""

    def __init__(self, ctx: StageContext, parent_id: str, every_s: float = 2.0) -> None:
        self.ctx, self.parent_id, self.every_s = ctx, parent_id, every_s
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        self.ctx.report(f"profile/{stage}", fraction)
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        shards = state.children(self.ctx.db, self.parent_id)
        mean = sum(1.0 if j.status == JobStatus.SUCCEEDED else j.progress
                   for j in shards) / max(len(shards), 1)
        done = sum(j.status == JobStatus.SUCCEEDED for j in shards)
        lo, hi = PARENT_SPAN
        state.set_progress(self.ctx.db, self.parent_id,
                           f"profile/shards {done}/{len(shards)} done", lo + (hi - lo) * mean)
