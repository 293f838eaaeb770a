"""Artifacts: a team's compressed models. Downloads go through the API only, from the path the
service recorded (never a path the client chooses)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from sqlalchemy import select

from service.api.deps import DbDep, SettingsDep, TeamDep
from service.api.schemas import ArtifactPublic
from service.db.models import Artifact
from service.errors import Conflict, NotFound

router = APIRouter(tags=["artifacts"])


def _artifact(db, team_id: str, artifact_id: str) -> Artifact:  # noqa: ANN001
    with db.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.id == artifact_id,
                                              Artifact.team_id == team_id))
    if art is None:
        raise NotFound(f"artifact {artifact_id} not found")
    return art


@router.get("/artifacts/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, team: TeamDep, db: DbDep) -> ArtifactPublic:
    art = _artifact(db, team.id, artifact_id)
    links = {"self": f"/v1/artifacts/{art.id}", "plan": f"/v1/plans/{art.plan_id}"}
    if art.job_id:
        links["job"] = f"/v1/jobs/{art.job_id}"
    if art.status == "ready":
        links["download"] = f"/v1/artifacts/{art.id}/download"
    return ArtifactPublic(id=art.id, plan_id=art.plan_id, job_id=art.job_id, status=art.status,
                          bytes=art.bytes, tensor_bytes=art.tensor_bytes, sha256=art.sha256,
                          metrics=art.metrics or {}, created_at=art.created_at,
                          finished_at=art.finished_at, links=links)


@router.get("/artifacts/{artifact_id}/download", response_class=FileResponse)
def download_artifact(artifact_id: str, team: TeamDep, db: DbDep,
                      settings: SettingsDep) -> FileResponse:
    art = _artifact(db, team.id, artifact_id)
    if art.status != "ready" or not art.path:
        raise Conflict(f"artifact {artifact_id} is not ready (status {art.status})",
                       code="artifact_not_ready")
    path = Path(art.path).resolve()
    root = Path(settings.data_dir).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        raise NotFound(f"artifact {artifact_id} has no downloadable file")
    return FileResponse(path, filename=path.name, media_type="application/octet-stream",
                        headers={"X-Checksum-SHA256": art.sha256 or ""})
