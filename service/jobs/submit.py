"""Turning requests into rows and tasks: models seen once, one shared profile job per (model,
target), plan jobs that wait on it, idempotency keys per team."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import (
    Artifact,
    ArtifactStatus,
    Job,
    JobKind,
    JobStatus,
    ModelRow,
    PlanRow,
    PlanStatus,
    ProfileRow,
    Team,
    new_id,
    utcnow,
)
from service.db.profile_store import DbProfileStore
from service.db.session import Database, serialize_on
from service.db.upsert import upsert
from service.errors import Conflict, Invalid, NotFound, TooManyRequests
from service.jobs import planning
from service.jobs.modelrefs import (
    ResolvedModel,
    check_gguf_convertible,
    model_inventory,
    resolve_model,
)
from service.jobs.queue import Queue
from service.jobs.registry import Task
from service.settings import Settings
from solver.bytes import TARGETS
from solver.gguf_types import GGUF_MENU

log = logging.getLogger(__name__)


def check_target(target: str) -> str:
    """The request's target (the API's schema already allows only these)."""
    if target not in TARGETS:
        raise Invalid(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


@dataclass(frozen=True)
class PlanRequest:
    """A plan request already validated by the API's PlanCreate (the JSON API and the dashboard
    build it with `PlanCreate.to_request()`; jobs do not import the API's schemas)."""
    model: str
    budget: str                      # as given: "3.25bpp", "0.9x", "850MiB", "123456789"
    method: str = "exact"
    constraints: dict | None = None  # solver constraints as JSON; None: none given
    compress: bool = False
    target: str = "native"           # "native" (CALDERA) or "gguf" (a llama.cpp type per tensor)

    def as_dict(self) -> dict:
        """The request as its JSON body (no None values): the idempotency hash and the job's
        payload, unchanged from when this was the body dict (a native request names no
        target, so its hash is the one it had before targets)."""
        body = {"model": self.model, "budget": self.budget, "method": self.method,
                "compress": self.compress}
        if self.constraints is not None:
            body["constraints"] = self.constraints
        if self.target != "native":
            body["target"] = self.target
        return body


@dataclass(frozen=True)
class Submitted:
    plan_id: str
    job_id: str
    profile_job_id: str | None
    created: bool          # False: an idempotent replay of an earlier request


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def get_or_create_model(db: Database, resolved: ResolvedModel, settings: Settings) -> ModelRow:
    """Look a model up by fingerprint; on first sight read its layer inventory from config.json
    and the safetensors headers (no torch: the API process never imports it).
    Not cached: the lookup (one indexed SELECT, 0.4-2 ms) is a few % of a POST /v1/plans
    (16-24 ms), within run-to-run noise, and a cached row outlives its database row."""
    with db.session() as s:
        row = s.scalar(select(ModelRow).where(ModelRow.fingerprint == resolved.fingerprint))
        if row is not None:
            return row
    inv = model_inventory(resolved.path, resolved.ref, settings.trust_remote_code)
    with db.session() as s:
        upsert(s, ModelRow.__table__, [{
            "id": new_id(), "ref": resolved.ref, "path": str(resolved.path),
            "fingerprint": resolved.fingerprint, "num_linears": len(inv.linears),
            "linear_params": inv.linear_params, "kept_bytes": inv.kept_bytes,
            "inventory": inv.to_dict(), "created_at": utcnow()}],
            keys=["fingerprint"], update_cols=[])
        row = s.scalar(select(ModelRow).where(ModelRow.fingerprint == resolved.fingerprint))
    return row


def resolve_and_register(db: Database, ref: str, settings: Settings) -> ModelRow:
    resolved = resolve_model(ref, settings.model_roots, settings.trust_remote_code)
    return get_or_create_model(db, resolved, settings)


def latest_profile_id(s: Session, model_id: str, target: str = "native") -> str | None:
    """The model's newest complete profile for `target` (one profile per target)."""
    return s.scalar(select(ProfileRow.id).where(ProfileRow.model_id == model_id,
                                                ProfileRow.target == target,
                                                ProfileRow.complete.is_(True))
                    .order_by(ProfileRow.completed_at.desc()).limit(1))


def profile_dedup_key(model: ModelRow, target: str = "native") -> str:
    """The shared profile job's identity: one per (model, target); a native one keeps the key
    it had before targets."""
    return f"profile:{model.fingerprint}" + ("" if target == "native" else f":{target}")


def gguf_menu(settings: Settings) -> tuple[str, ...]:
    """The GGUF types a gguf profile samples (the operator's profile_config may narrow them)."""
    return tuple((settings.profile_config or {}).get("gguf_types") or GGUF_MENU)


def ensure_profile_job(s: Session, model: ModelRow, team_id: str,
                       target: str = "native") -> tuple[Job, bool]:
    """The one profile job of this model for `target` (shared by all teams). Returns (job,
    needs_enqueue): True when it was just created, or when an earlier attempt failed and is
    being retried."""
    dedup = profile_dedup_key(model, target)
    new = new_id()
    upsert(s, Job.__table__, [{
        "id": new, "team_id": None, "created_by_team": team_id, "kind": JobKind.PROFILE,
        "status": JobStatus.QUEUED, "stage": "queued", "progress": 0.0, "attempts": 0,
        "dedup_key": dedup, "model_id": model.id,
        "payload": {"model": model.ref, "target": target},
        "result": {}, "history": [["queued", utcnow().isoformat()]], "created_at": utcnow(),
        "updated_at": utcnow()}], keys=["dedup_key"], update_cols=[])
    job = s.scalar(select(Job).where(Job.dedup_key == dedup))
    if job.id == new:
        return job, True
    if job.status == JobStatus.FAILED or (job.status == JobStatus.SUCCEEDED
                                          and latest_profile_id(s, model.id, target) is None):
        log.info("re-queuing profile job %s (was %s)", job.id, job.status)
        job.status, job.stage, job.progress = JobStatus.QUEUED, "queued", 0.0
        job.error = job.error_code = None
        job.finished_at = None
        job.updated_at = utcnow()
        return job, True
    return job, False


def _replay(s: Session, team_id: str, idem_key: str, rhash: str) -> Submitted | None:
    job = s.scalar(select(Job).where(Job.team_id == team_id, Job.idempotency_key == idem_key))
    if job is None:
        return None
    if job.request_hash != rhash:
        raise Conflict(f"idempotency key {idem_key!r} was already used with a different request",
                       code="idempotency_conflict")
    return Submitted(job.plan_id, job.id, job.depends_on, created=False)


def check_team_limit(s: Session, team_id: str, settings: Settings, *, lock: bool = True) -> None:
    """429 when the team already has its quota of unfinished jobs (queued or running). With
    `lock`, call it in the transaction that then inserts the job: the team's lock is held until
    commit, so concurrent requests of one team count and insert one after another."""
    limit = settings.max_concurrent_jobs_per_team
    if limit <= 0:
        return
    if lock:
        serialize_on(s, Team.id, team_id)
    active = s.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))
    if active >= limit:
        raise TooManyRequests(f"your team already has {active} unfinished jobs (limit {limit}); "
                              "wait for some to finish and retry",
                              code="too_many_jobs", headers={"Retry-After": "10"})


def submit_plan(db: Database, queue: Queue, settings: Settings, team_id: str, req: PlanRequest,
                idem_key: str | None = None) -> Submitted:
    """Create the plan and its job; profile first when the model has no profile yet."""
    body = req.as_dict()
    rhash = request_hash(body)
    if idem_key:
        with db.session() as s:
            replay = _replay(s, team_id, idem_key, rhash)
        if replay:
            return replay
    model = resolve_and_register(db, req.model, settings)
    target = check_target(req.target)
    if target == "gguf":      # before any work: llama.cpp's converter must know the model
        check_gguf_convertible(Path(model.path))
    budget_bytes = planning.budget_bytes(model.inventory, req.budget)   # the one parse
    constraints = req.constraints or None
    planning.check_constraints(constraints, model.inventory)
    with db.session() as s:
        profile_id = latest_profile_id(s, model.id, target)
        check_team_limit(s, team_id, settings, lock=False)   # fail fast; enforced below
    profile = DbProfileStore(db).get_by_id(profile_id) if profile_id is not None else None
    if profile is not None:   # infeasible budgets fail now, with the solver's message
        planning.problem_at(profile, budget_bytes, constraints, profile_id)
    else:                     # no profile yet: the inventory's bounds (2-bit Q / cheapest type)
        planning.check_inventory_minimum(budget_bytes, model.inventory, target,
                                         gguf_menu(settings))

    to_enqueue: list[tuple[str, str]] = []
    try:
        with db.session() as s:
            check_team_limit(s, team_id, settings)     # locks the team until this commits
            if idem_key and (replay := _replay(s, team_id, idem_key, rhash)) is not None:
                return replay                          # a concurrent twin committed first
            plan = PlanRow(id=new_id(), team_id=team_id, model_id=model.id, profile_id=profile_id,
                           budget=req.budget, method=req.method, target=target,
                           constraints=req.constraints or {}, compress=req.compress,
                           status=PlanStatus.PENDING,
                           budget_bytes=budget_bytes)
            job = Job(id=new_id(), team_id=team_id, kind=JobKind.PLAN, status=JobStatus.QUEUED,
                      idempotency_key=idem_key, request_hash=rhash, plan_id=plan.id,
                      model_id=model.id, profile_id=profile_id, payload=body,
                      stage="queued", history=[["queued", utcnow().isoformat()]])
            profile_job_id = None
            if profile_id is None:
                pjob, needs = ensure_profile_job(s, model, team_id, target)
                profile_job_id = job.depends_on = pjob.id
                job.stage = "waiting for profile"
                if needs:
                    to_enqueue.append((Task.PROFILE, pjob.id))
            else:
                to_enqueue.append((Task.SOLVE, job.id))
            plan.job_id = job.id
            s.add_all([plan, job])
            s.flush()
            plan_id, job_id = plan.id, job.id
    except IntegrityError:
        if not idem_key:
            raise
        with db.session() as s:     # a concurrent request with the same key won the race
            replay = _replay(s, team_id, idem_key, rhash)
        if replay is None:
            raise
        return replay
    for task, jid in to_enqueue:
        queue.enqueue(task, jid)
    if profile_job_id is not None:   # the profile may have finished while we were committing
        with db.session() as s:
            dep_status = s.scalar(select(Job.status).where(Job.id == profile_job_id))
        if dep_status == JobStatus.SUCCEEDED:
            queue.enqueue(Task.SOLVE, job_id)
    return Submitted(plan_id, job_id, profile_job_id, created=True)


def request_compress(db: Database, queue: Queue, team_id: str, plan_id: str,
                     settings: Settings) -> tuple[str, str]:
    """(artifact id, job id) for compressing a solved plan; asking twice returns the same.
    `settings` is required: they carry the team job limit, which a new compress job counts
    against (an optional one let a caller skip the limit without noticing)."""
    with db.session() as s:
        plan = s.scalar(select(PlanRow).where(PlanRow.id == plan_id, PlanRow.team_id == team_id))
        if plan is None:
            raise NotFound(f"plan {plan_id} not found")
        if plan.status != PlanStatus.SOLVED:
            raise Conflict(f"plan {plan_id} is not solved yet (status {plan.status})",
                           code="plan_not_ready")
        if settings.max_concurrent_jobs_per_team > 0:
            serialize_on(s, Team.id, team_id)           # count and insert atomically
            if not s.scalar(select(func.count()).select_from(Job).where(
                    Job.plan_id == plan_id, Job.kind == JobKind.COMPRESS)):
                check_team_limit(s, team_id, settings, lock=False)   # already locked
        job = ensure_compress_job(s, plan)
        job_id, art_id, status = job.id, job.artifact_id, job.status
    if status == JobStatus.QUEUED:
        queue.enqueue(Task.COMPRESS, job_id)
    return art_id, job_id


def ensure_compress_job(s: Session, plan: PlanRow) -> Job:
    """One artifact (and one compress job) per plan: asking twice returns the same ones."""
    upsert(s, Artifact.__table__, [{"id": new_id(), "team_id": plan.team_id, "plan_id": plan.id,
                                    "status": ArtifactStatus.PENDING, "metrics": {},
                                    "created_at": utcnow()}],
           keys=["plan_id"], update_cols=[])
    art = s.scalar(select(Artifact).where(Artifact.plan_id == plan.id))
    dedup = f"compress:{plan.id}"
    upsert(s, Job.__table__, [{"id": new_id(), "team_id": plan.team_id, "kind": JobKind.COMPRESS,
                               "status": JobStatus.QUEUED, "stage": "queued", "progress": 0.0,
                               "attempts": 0, "dedup_key": dedup, "plan_id": plan.id,
                               "model_id": plan.model_id, "profile_id": plan.profile_id,
                               "artifact_id": art.id, "payload": {}, "result": {},
                               "history": [], "created_at": utcnow(),
                               "updated_at": utcnow()}], keys=["dedup_key"], update_cols=[])
    job = s.scalar(select(Job).where(Job.dedup_key == dedup))
    art.job_id = job.id
    return job
