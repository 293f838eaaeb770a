"""Solve stage (CPU queue): the plan's allocation problem at its budget in bytes (parsed once,
at submit), from the model's stored profile."""

from __future__ import annotations

from service.db.models import Job, PlanRow, PlanStatus, utcnow
from service.db.profile_store import DbProfileStore, profile_target
from service.jobs.context import StageContext, StageResult
from service.jobs.planning import solve_plan
from service.jobs.registry import Task
from service.jobs.state import JobFailed
from service.jobs.submit import ensure_compress_job, latest_profile_id


def _profile_for(ctx: StageContext, job: Job, plan: PlanRow) -> str | None:
    if plan.profile_id:
        return plan.profile_id
    with ctx.db.session() as s:
        if job.depends_on:
            dep = s.get(Job, job.depends_on)
            if dep is not None and dep.profile_id:
                return dep.profile_id
        return latest_profile_id(s, plan.model_id, plan.target)


def solve_stage(ctx: StageContext) -> StageResult:
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        plan = s.get(PlanRow, job.plan_id) if job.plan_id else None
    if plan is None:
        raise JobFailed("solve job has no plan", "invalid_job")
    profile_id = _profile_for(ctx, job, plan)
    profile = DbProfileStore(ctx.db).get_by_id(profile_id) if profile_id else None
    if profile is None:
        raise JobFailed("no complete profile for this model", "profile_missing")
    if profile_target(profile.config) != plan.target:
        raise JobFailed(f"profile {profile_id} is a {profile_target(profile.config)} profile; "
                        f"this plan's target is {plan.target}", "profile_mismatch")
    ctx.report("solve", 0.05)
    result = solve_plan(profile, plan.budget_bytes, plan.constraints, plan.method, profile_id)
    follow: list[tuple[str, str]] = []
    with ctx.db.session() as s:
        row = s.get(PlanRow, plan.id)
        row.profile_id = profile_id
        row.result = result.to_dict()
        row.status = PlanStatus.SOLVED
        row.solved_at = utcnow()
        row.total_bytes = result.total_bytes
        row.predicted_error = result.predicted_error
        row.optimality_gap = result.gap
        if row.compress:
            follow.append((Task.COMPRESS, ensure_compress_job(s, row).id))
    summary = {"total_bytes": result.total_bytes, "budget_bytes": plan.budget_bytes,
               "predicted_error": result.predicted_error, "optimality_gap": result.gap}
    return StageResult(result=summary | {"plan_id": plan.id}, links={"profile_id": profile_id},
                       follow_ups=follow)
