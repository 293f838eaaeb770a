"""Artifacts: a team's compressed models. Downloads go through the API only, from the path the
service recorded (never a path the client chooses).

An artifact is a directory; it downloads as one deterministic tar of that directory
(compressor/artifact/archive.py) whose sha256 is the artifact's recorded digest, sent as
X-Checksum-SHA256 beside Content-Length. GET …/files lists every file in the archive with its
size and sha256, so a client can check the unpacked files one by one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from compressor.artifact.archive import (
    Archive,
    ArchiveError,
    file_sha256,
    plan_archive,
    recorded_file_digests,
)
from service.api.deps import DbDep, SettingsDep, TeamDep
from service.api.schemas import ArtifactFile, ArtifactFiles, ArtifactPublic
from service.db.models import Artifact
from service.db.session import Database
from service.errors import Conflict, NotFound
from service.jobs.control import delete_artifact
from service.settings import Settings

router = APIRouter(tags=["artifacts"])
log = logging.getLogger(__name__)


def _artifact(db, team_id: str, artifact_id: str) -> Artifact:
    with db.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.id == artifact_id,
                                              Artifact.team_id == team_id))
    if art is None:
        raise NotFound(f"artifact {artifact_id} not found")
    return art


def _archive(art: Artifact, settings: Settings) -> Archive:
    """The planned archive of a ready artifact's directory, which must lie under the data dir."""
    if art.status != "ready" or not art.path:
        raise Conflict(f"artifact {art.id} is not ready (status {art.status})",
                       code="artifact_not_ready")
    path = Path(art.path).resolve()
    root = Path(settings.data_dir).resolve()
    if not path.is_relative_to(root) or not path.is_dir():
        raise NotFound(f"artifact {art.id} has no files on this server")
    try:
        return plan_archive(path)
    except (ArchiveError, OSError) as exc:
        raise NotFound(f"artifact {art.id} has no readable files on this server") from exc


def _digest(db: Database, art: Artifact, arch: Archive) -> str:
    """The recorded archive digest. Rows written before downloads were archives hold the sha256
    of one file (which the manifest lists) or none: those are recomputed once and recorded."""
    if art.sha256 and art.sha256 not in recorded_file_digests(arch.root).values():
        return art.sha256
    try:
        digest = arch.sha256()
    except (ArchiveError, OSError) as exc:
        raise Conflict(f"artifact {art.id} changed on disk while it was read; retry",
                       code="artifact_unavailable") from exc
    with db.session() as s:
        row = s.get(Artifact, art.id)
        if row is not None:
            row.sha256 = digest
    log.info("artifact %s: recorded its archive digest (was %s)", art.id, art.sha256)
    return digest


@router.get("/artifacts/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, team: TeamDep, db: DbDep) -> ArtifactPublic:
    art = _artifact(db, team.id, artifact_id)
    links = {"self": f"/v1/artifacts/{art.id}", "plan": f"/v1/plans/{art.plan_id}"}
    if art.job_id:
        links["job"] = f"/v1/jobs/{art.job_id}"
    if art.status == "ready":
        links["download"] = f"/v1/artifacts/{art.id}/download"
        links["files"] = f"/v1/artifacts/{art.id}/files"
    return ArtifactPublic(id=art.id, plan_id=art.plan_id, job_id=art.job_id, status=art.status,
                          bytes=art.bytes, tensor_bytes=art.tensor_bytes, sha256=art.sha256,
                          metrics=art.metrics or {}, created_at=art.created_at,
                          finished_at=art.finished_at, links=links)


@router.get("/artifacts/{artifact_id}/files", response_model=ArtifactFiles)
def artifact_files(artifact_id: str, team: TeamDep, db: DbDep,
                   settings: SettingsDep) -> ArtifactFiles:
    """Every file of the download, by its path in the archive. Digests are the ones the
    artifact's manifest recorded when it was written (the manifest itself is hashed here)."""
    art = _artifact(db, team.id, artifact_id)
    arch = _archive(art, settings)
    recorded = recorded_file_digests(arch.root)
    try:
        files = [ArtifactFile(path=e.name, bytes=e.size,
                              sha256=recorded.get(e.rel) or file_sha256(e.path))
                 for e in arch.files() if e.path is not None]
    except (ArchiveError, OSError) as exc:
        raise Conflict(f"artifact {art.id} changed on disk while it was read; retry",
                       code="artifact_unavailable") from exc
    return ArtifactFiles(artifact_id=art.id, archive_sha256=_digest(db, art, arch),
                         archive_bytes=arch.size, files=files)


def _stream(art_id: str, arch: Archive) -> Iterator[bytes]:
    try:
        yield from arch.chunks()
    except (ArchiveError, OSError):
        # headers are gone already: the connection is cut short, the client's length and
        # checksum checks fail, and the operator learns why
        log.exception("artifact %s: download aborted", art_id)
        raise


@router.get("/artifacts/{artifact_id}/download", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "the artifact directory as an uncompressed tar"}})
def download_artifact(artifact_id: str, team: TeamDep, db: DbDep,
                      settings: SettingsDep) -> StreamingResponse:
    art = _artifact(db, team.id, artifact_id)
    arch = _archive(art, settings)
    digest = _digest(db, art, arch)
    headers = {"Content-Length": str(arch.size), "X-Checksum-SHA256": digest,
               "ETag": f'"{digest}"',
               "Content-Disposition": f'attachment; filename="{arch.root.name}.tar"'}
    return StreamingResponse(_stream(art.id, arch), media_type="application/x-tar",
                             headers=headers)


@router.delete("/artifacts/{artifact_id}", status_code=204, response_class=Response)
def remove_artifact(artifact_id: str, team: TeamDep, db: DbDep,
                    settings: SettingsDep) -> Response:
    """Delete an artifact of your team (files and row); an unfinished compress is cancelled.
    The plan stays and can be compressed again."""
    delete_artifact(db, settings, team.id, artifact_id)
    return Response(status_code=204)
