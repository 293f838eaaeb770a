"""A team lead's admin: cancel a job, list/create/revoke the team's keys, and the service's
status (queued/running per queue, workers seen recently by their heartbeats)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import DbDep, SettingsDep, TeamDep
from service.api.schemas import (
    JobCancelled,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    QueueStatus,
    ServiceStatus,
    WorkerPublic,
)
from service.db.auth import create_key, list_keys, revoke_team_key
from service.db.models import ApiKey, utcnow
from service.db.session import Database
from service.errors import NotFound
from service.jobs.control import cancel_job
from service.jobs.workers import queue_counts, recent_workers
from service.settings import Settings

router = APIRouter(tags=["admin"])


def key_public(k: ApiKey) -> KeyPublic:
    return KeyPublic(id=k.id, key_id=k.key_id, label=k.label, created_at=k.created_at,
                     revoked_at=k.revoked_at, last_used_at=k.last_used_at)


@router.post("/jobs/{job_id}/cancel", response_model=JobCancelled)
def cancel(job_id: str, team: TeamDep, db: DbDep) -> JobCancelled:
    return JobCancelled(job_id=job_id, was=cancel_job(db, team.id, job_id))


@router.get("/keys", response_model=list[KeyPublic])
def get_keys(team: TeamDep, db: DbDep) -> list[KeyPublic]:
    with db.session() as s:
        return [key_public(k) for k in list_keys(s, team.id)]


@router.post("/keys", response_model=KeyCreated, status_code=201)
def new_key(body: KeyCreate, team: TeamDep, db: DbDep) -> KeyCreated:
    with db.session() as s:
        row, plaintext = create_key(s, team, body.label)
        return KeyCreated(**key_public(row).model_dump(), key=plaintext)


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
def revoke(key_id: str, team: TeamDep, db: DbDep) -> Response:
    """Revoke one of your team's keys (by id or public key id); its dashboard sessions end."""
    with db.session() as s:
        if revoke_team_key(s, team.id, key_id) is None:
            raise NotFound(f"key {key_id} not found")
    return Response(status_code=204)


def service_status(db: Database, settings: Settings, team_id: str) -> ServiceStatus:
    window = 3 * settings.worker_heartbeat_s
    now = utcnow()
    return ServiceStatus(
        queues={q: QueueStatus(**vars(c)) for q, c in queue_counts(db, team_id).items()},
        workers=[WorkerPublic(id=w.id, kind=w.kind, host=w.host, queues=list(w.queues),
                              seen_at=w.seen_at, age_s=round((now - w.seen_at).total_seconds(), 1))
                 for w in recent_workers(db, window)],
        window_s=window)


@router.get("/status", response_model=ServiceStatus)
def get_status(team: TeamDep, db: DbDep, settings: SettingsDep) -> ServiceStatus:
    """Jobs queued and running on each queue (everyone's, and yours), and the workers whose
    heartbeat was seen within three beats."""
    return service_status(db, settings, team.id)
