"""What a team does to its own jobs, plans and artifacts after submitting them: cancel a job,
delete a plan or an artifact. The JSON API, the dashboard and the CLI all call these, so every
path keeps the same team isolation (another team's id is as unknown as a missing one: 404)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import delete, or_, select

from service.db.models import TERMINAL, Artifact, Job, JobKind, JobStatus, PlanRow
from service.db.session import Database
from service.errors import Conflict, NotFound
from service.jobs import state
from service.settings import Settings

log = logging.getLogger(__name__)


def cancel_job(db: Database, team_id: str, job_id: str) -> str:
    """Cancel one of the team's unfinished jobs; returns its status before. Shared profile jobs
    (which other teams' plans may wait on) cannot be cancelled by one team: 409."""
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, or_(Job.team_id == team_id,
                                                               Job.team_id.is_(None))))
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.team_id is None:
            raise Conflict(f"job {job_id} is a shared {job.kind} job; cancel your plan's job "
                           "instead", code="shared_job")
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
    before = state.cancel(db, job_id)
    log.info("job %s cancelled by team %s (was %s)", job_id, team_id, before)
    return before


def _remove_files(settings: Settings, path: str | None, art_id: str) -> None:
    """An artifact's directory and its per-linear work, only ever under the data dir."""
    root = (Path(settings.data_dir) / "artifacts").resolve()
    for p in ([Path(path)] if path else []) + [root / art_id, root / f"{art_id}.partial"]:
        p = p.resolve()
        if p.is_relative_to(root) and p != root:
            shutil.rmtree(p, ignore_errors=True)


def _cancel_unfinished(db: Database, job_ids: list[str]) -> None:
    for jid in job_ids:
        state.cancel(db, jid)   # a no-op on finished jobs


def delete_artifact(db: Database, settings: Settings, team_id: str, artifact_id: str) -> None:
    """Delete one of the team's artifacts: its compress job is cancelled if unfinished (and its
    dedup key given back, so the plan can be compressed again), then its files and row go."""
    with db.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.id == artifact_id,
                                              Artifact.team_id == team_id))
        if art is None:
            raise NotFound(f"artifact {artifact_id} not found")
        jobs = s.scalars(select(Job.id).where(Job.artifact_id == artifact_id)).all()
        path = art.path
    _cancel_unfinished(db, list(jobs))
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.artifact_id == artifact_id)):
            job.dedup_key = None
        s.execute(delete(Artifact).where(Artifact.id == artifact_id))
    _remove_files(settings, path, artifact_id)


def delete_plan(db: Database, settings: Settings, team_id: str, plan_id: str) -> None:
    """Delete one of the team's plans with its artifact; its unfinished jobs are cancelled.
    Finished jobs stay in the team's history (their plan link then answers 404)."""
    with db.session() as s:
        plan = s.scalar(select(PlanRow).where(PlanRow.id == plan_id, PlanRow.team_id == team_id))
        if plan is None:
            raise NotFound(f"plan {plan_id} not found")
        art_id = s.scalar(select(Artifact.id).where(Artifact.plan_id == plan_id))
        jobs = s.scalars(select(Job.id).where(Job.plan_id == plan_id,
                                              Job.kind.in_([JobKind.PLAN, JobKind.COMPRESS]),
                                              Job.status.in_([JobStatus.QUEUED,
                                                              JobStatus.RUNNING]))).all()
    _cancel_unfinished(db, list(jobs))
    if art_id is not None:
        delete_artifact(db, settings, team_id, art_id)
    with db.session() as s:
        s.execute(delete(PlanRow).where(PlanRow.id == plan_id, PlanRow.team_id == team_id))
