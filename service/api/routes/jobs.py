"""Job status: what a client polls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.api.deps import DbDep, TeamDep
from service.api.schemas import ErrorBody, JobPublic
from service.db.models import Job, JobStatus, Team
from service.errors import NotFound

router = APIRouter(tags=["jobs"])
WAIT_SHARE = 0.9   # of a waiting plan job's progress, the part its profile job accounts for


def visible_job(s: Session, team: Team, job_id: str) -> Job:
    """Team jobs are private; shared profile jobs (team_id NULL) are visible to every team."""
    job = s.scalar(select(Job).where(Job.id == job_id,
                                     or_(Job.team_id == team.id, Job.team_id.is_(None))))
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def job_public(s: Session, job: Job) -> JobPublic:
    stage, progress, waiting_on = job.stage, job.progress, None
    if job.status == JobStatus.QUEUED and job.depends_on:
        dep = s.get(Job, job.depends_on)
        if dep is not None and dep.status != JobStatus.SUCCEEDED:
            waiting_on = dep.id
            # a sharded profile is queued while its shards run, with their progress
            stage = dep.stage if dep.status == JobStatus.RUNNING or dep.progress > 0 \
                else f"waiting for {dep.kind}"
            progress = WAIT_SHARE * dep.progress
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.plan_id:
        links["plan"] = f"/v1/plans/{job.plan_id}"
    if job.artifact_id:
        links["artifact"] = f"/v1/artifacts/{job.artifact_id}"
    if waiting_on:
        links["waiting_on"] = f"/v1/jobs/{waiting_on}"
    if job.model_id:
        links["model"] = f"/v1/models/{job.model_id}"
    return JobPublic(
        id=job.id, kind=job.kind, status=job.status, stage=stage, progress=round(progress, 4),
        attempts=job.attempts,
        error=ErrorBody(code=job.error_code or "job_failed", message=job.error)
        if job.status == JobStatus.FAILED and job.error else None,
        waiting_on=waiting_on, plan_id=job.plan_id, profile_id=job.profile_id,
        artifact_id=job.artifact_id, result=job.result or {},
        history=[[str(a), str(b)] for a, b in (job.history or [])],
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at,
        finished_at=job.finished_at, links=links)


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(team: TeamDep, db: DbDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[JobPublic]:
    """This team's jobs, newest first (shared profile jobs are reached through their links)."""
    with db.session() as s:
        q = select(Job).where(Job.team_id == team.id)
        if status is not None:
            q = q.where(Job.status == status)
        rows = s.scalars(q.order_by(Job.created_at.desc()).limit(limit)).all()
        return [job_public(s, j) for j in rows]


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, team: TeamDep, db: DbDep) -> JobPublic:
    with db.session() as s:
        return job_public(s, visible_job(s, team, job_id))
