"""The typed client without a server (httpx.MockTransport): errors carry the API's code, a
download whose bytes do not hash to the advertised sha256 is refused and nothing is kept, a good
one is kept and its unpacked files are checked one by one; its types mirror the API's response
schemas field for field."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile

import httpx
import pytest

from service.client import BitplanClient, BitplanError, ChecksumMismatch


def _tar() -> tuple[bytes, dict[str, str]]:
    buf = io.BytesIO()
    files = {"art/manifest.json": b'{"a": 1}', "art/compressed.safetensors": b"\x00" * 1000}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


def _client(body: bytes, digest: str, listed: str | None = None,
            file_digests: dict[str, str] | None = None) -> BitplanClient:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["authorization"] == "Bearer bp_k_s"
        if req.url.path == "/v1/artifacts/a1/files":
            return httpx.Response(200, json={
                "artifact_id": "a1", "archive_sha256": listed or digest,
                "archive_bytes": len(body),
                "files": [{"path": p, "bytes": 0, "sha256": h}
                          for p, h in (file_digests or {}).items()]})
        if req.url.path == "/v1/artifacts/a1/download":
            return httpx.Response(200, content=body, headers={
                "X-Checksum-SHA256": digest, "Content-Length": str(len(body)),
                "Content-Disposition": 'attachment; filename="../../art.tar"'})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "nope"}})

    return BitplanClient("http://server", "bp_k_s", transport=httpx.MockTransport(handler))


def test_download_verifies_and_extracts(tmp_path):
    body, files = _tar()
    digest = hashlib.sha256(body).hexdigest()
    with _client(body, digest, file_digests=files) as bp:
        got = bp.download("a1", tmp_path, extract=True)
    assert got.sha256 == digest and got.bytes == len(body) and got.files_checked == 2
    assert got.path == tmp_path / "art" and (tmp_path / "art.tar").read_bytes() == body


@pytest.mark.parametrize("bad", ["header", "listing", "file"])
def test_download_refuses_a_wrong_checksum(tmp_path, bad):
    body, files = _tar()
    good = hashlib.sha256(body).hexdigest()
    with _client(body, "0" * 64 if bad == "header" else good,
                 listed="f" * 64 if bad == "listing" else None,
                 file_digests=files | {"art/manifest.json": "1" * 64} if bad == "file"
                 else files) as bp:
        with pytest.raises(ChecksumMismatch):
            bp.download("a1", tmp_path, extract=True)
    if bad != "file":      # a bad archive is never kept
        assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*.part"))


def test_errors_carry_status_and_code(tmp_path):
    with _client(b"", "") as bp:
        with pytest.raises(BitplanError) as err:
            bp.job("missing")
    assert err.value.status == 404 and err.value.code == "not_found"
    assert json.loads(json.dumps(err.value.message)) == "nope"


def test_needs_server_and_key(monkeypatch):
    monkeypatch.delenv("BITPLAN_SERVER", raising=False)
    monkeypatch.delenv("BITPLAN_API_KEY", raising=False)
    with pytest.raises(ValueError, match="BITPLAN_SERVER"):
        BitplanClient()
    monkeypatch.setenv("BITPLAN_SERVER", "http://x")
    with pytest.raises(ValueError, match="BITPLAN_API_KEY"):
        BitplanClient()


# each client type and the API schema it mirrors; Downloaded is the client's own
MIRRORS = {"Job": "JobPublic", "Model": "ModelPublic", "Accepted": "PlanAccepted",
           "Plan": "PlanPublic", "Artifact": "ArtifactPublic"}
CLIENT_ONLY = {"Downloaded"}


def _shape_of_dataclass(cls) -> tuple[set[str], set[str]]:
    fs = dataclasses.fields(cls)
    required = {f.name for f in fs if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    return {f.name for f in fs}, required


def _shape_of_schema(model) -> tuple[set[str], set[str]]:
    return set(model.model_fields), {n for n, f in model.model_fields.items() if f.is_required()}


def test_client_types_mirror_the_api_schemas():
    """The client re-declares the response bodies (no pydantic on a laptop): a field added to,
    dropped from or made optional in a schema must change the client too, or this fails."""
    import service.client as client
    from service.api import schemas

    declared = {n for n, c in vars(client).items() if dataclasses.is_dataclass(c)
                and c.__module__ == client.__name__}
    assert declared == set(MIRRORS) | CLIENT_ONLY      # a new client type names its schema
    for ours, theirs in MIRRORS.items():
        assert _shape_of_dataclass(getattr(client, ours)) == \
            _shape_of_schema(getattr(schemas, theirs)), ours


def test_a_server_answer_fills_every_field():
    """What the API serialises (JSON, timestamps as strings) becomes the client's type with
    nothing lost; keys a newer server adds are ignored."""
    from datetime import UTC, datetime

    from service.api.schemas import JobPublic
    from service.client import Job, _take

    now = datetime.now(UTC)
    body = JobPublic(id="j", kind="plan", status="queued", stage="waiting for profile",
                     progress=0.0, attempts=0, waiting_on="p", profile_id="pr", plan_id="pl",
                     history=[["queued", now.isoformat()]], created_at=now, updated_at=now,
                     links={"waiting_on": "/v1/jobs/p"}).model_dump(mode="json")
    job = _take(Job, body | {"added_later": 1})
    assert dataclasses.asdict(job) == body
    assert job.waiting_on == "p" and job.profile_id == "pr" and not job.done
