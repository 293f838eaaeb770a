"""A typed HTTP client for a bitplan server (httpx only: no torch, no database), used by
`bitplan remote …` and importable on its own:

    from service.client import BitplanClient
    with BitplanClient("http://gpu-box:8000", "bp_…") as bp:
        acc = bp.submit_plan("bitplan-demo", "3.25bpp")
        job = bp.wait(acc.job_id, on_progress=lambda j: print(j.stage, j.progress))
        plan = bp.plan(acc.plan_id)

Downloads are verified: the archive's sha256 is computed while it streams and must equal both
the X-Checksum-SHA256 header and the artifact's recorded digest (GET …/files); with
`extract=True` every unpacked file is checked against its listed sha256 too."""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20


class BitplanError(Exception):
    """An error answer of the server: HTTP status, stable code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})")
        self.status, self.code, self.message = status, code, message


class ChecksumMismatch(BitplanError):
    def __init__(self, message: str) -> None:
        super().__init__(0, "checksum_mismatch", message)


def _take(cls, data: dict) -> Any:
    # keys a newer server adds are dropped, so an older client keeps working
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# The API's response bodies (service/api/schemas.py), mirrored field for field without pydantic
# so the client stays light: tests/service/test_client.py fails when the two drift apart.
# Timestamps stay ISO-8601 strings; nested objects stay dicts.

@dataclass(frozen=True)
class Job:
    """JobPublic."""
    id: str
    kind: str
    status: str
    stage: str
    progress: float
    attempts: int
    created_at: str
    updated_at: str
    error: dict | None = None             # {"code", "message"}
    waiting_on: str | None = None         # the job this one waits for (e.g. its model's profile)
    plan_id: str | None = None
    profile_id: str | None = None
    artifact_id: str | None = None
    result: dict = field(default_factory=dict)
    history: list[list[str]] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    links: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Model:
    """ModelPublic."""
    id: str
    ref: str
    num_linears: int
    linear_params: int
    kept_bytes: int
    profiled: bool
    created_at: str
    weights_hash: str | None = None
    profile_id: str | None = None
    profiled_at: str | None = None
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """PlanAccepted."""
    plan_id: str
    job_id: str
    status: str
    links: dict[str, str]
    profile_job_id: str | None = None


@dataclass(frozen=True)
class Plan:
    """PlanPublic."""
    id: str
    status: str
    model: dict                           # {"id", "ref"}
    budget: str
    method: str
    constraints: dict
    created_at: str
    target: str = "native"
    budget_bytes: int | None = None
    total_bytes: int | None = None
    predicted_error: float | None = None
    optimality_gap: float | None = None
    notes: list[str] = field(default_factory=list)
    linears: list[dict] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    job_id: str | None = None
    profile_id: str | None = None
    solved_at: str | None = None
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    """ArtifactPublic."""
    id: str
    plan_id: str
    job_id: str | None
    status: str
    created_at: str
    bytes: int | None = None
    tensor_bytes: int | None = None
    sha256: str | None = None
    metrics: dict = field(default_factory=dict)
    finished_at: str | None = None
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Downloaded:
    path: Path               # the .tar, or the directory it was unpacked into
    sha256: str
    bytes: int
    files_checked: int       # unpacked files whose sha256 matched the listing (0: not unpacked)


class BitplanClient:
    """One server, one team key. Raises BitplanError for any error answer."""

    def __init__(self, server: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        server = server or os.environ.get("BITPLAN_SERVER")
        api_key = api_key or os.environ.get("BITPLAN_API_KEY")
        if not server:
            raise ValueError("no server: pass one or set BITPLAN_SERVER (e.g. http://host:8000)")
        if not api_key:
            raise ValueError("no API key: pass one or set BITPLAN_API_KEY")
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}",
                                           "Accept": "application/json"})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------
    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        try:
            err = r.json()["error"]
            raise BitplanError(r.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise BitplanError(r.status_code, "http_error", r.text[:300] or r.reason_phrase
                               ) from None

    def _get(self, path: str, **params: Any) -> Any:
        return self._check(self._http.get(path, params=params or None)).json()

    def _post(self, path: str, body: dict | None = None, headers: dict | None = None) -> Any:
        return self._check(self._http.post(path, json=body, headers=headers)).json()

    def _delete(self, path: str) -> None:
        self._check(self._http.delete(path))

    # -- models and plans ----------------------------------------------------------------
    def models(self) -> list[Model]:
        return [_take(Model, m) for m in self._get("/v1/models")]

    def feasibility(self, model_id: str, target: str = "native") -> dict:
        return self._get(f"/v1/models/{model_id}/feasibility",
                         **({} if target == "native" else {"target": target}))

    def submit_plan(self, model: str, budget: str | int, *, constraints: dict | None = None,
                    method: str = "exact", compress: bool = False, target: str = "native",
                    idempotency_key: str | None = None) -> Accepted:
        """`target`: "native" (the CALDERA format), "gguf" (a llama.cpp type per tensor) or
        "compressed-tensors" (a vLLM scheme per module)."""
        body: dict[str, Any] = {"model": model, "budget": budget, "method": method,
                                "compress": compress}
        if target != "native":   # an older server, which knows no target, takes native plans
            body["target"] = target
        if constraints:
            body["constraints"] = constraints
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _take(Accepted, self._post("/v1/plans", body, headers))

    def plan(self, plan_id: str) -> Plan:
        return _take(Plan, self._get(f"/v1/plans/{plan_id}"))

    def plans(self) -> list[dict]:
        return self._get("/v1/plans")

    def recipe(self, plan_id: str) -> str:
        return self._check(self._http.get(f"/v1/plans/{plan_id}/recipe.yaml")).text

    def delete_plan(self, plan_id: str) -> None:
        self._delete(f"/v1/plans/{plan_id}")

    # -- jobs ----------------------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        return _take(Job, self._get(f"/v1/jobs/{job_id}"))

    def jobs(self, status: str | None = None) -> list[Job]:
        params = {"status": status} if status else {}
        return [_take(Job, j) for j in self._get("/v1/jobs", **params)]

    def cancel(self, job_id: str) -> str:
        """Returns the job's status when it was cancelled."""
        return self._post(f"/v1/jobs/{job_id}/cancel")["was"]

    def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None,
             poll_s: float = 0.5, timeout: float | None = None) -> Job:
        """Poll until the job has finished (succeeded, failed or cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll_s)

    # -- artifacts -----------------------------------------------------------------------
    def compress(self, plan_id: str) -> tuple[str, str]:
        """(artifact id, job id); asking twice returns the same ones."""
        out = self._post(f"/v1/plans/{plan_id}/compress")
        return out["artifact_id"], out["job_id"]

    def artifact(self, artifact_id: str) -> Artifact:
        return _take(Artifact, self._get(f"/v1/artifacts/{artifact_id}"))

    def delete_artifact(self, artifact_id: str) -> None:
        self._delete(f"/v1/artifacts/{artifact_id}")

    def download(self, artifact_id: str, dest: Path, *, extract: bool = False,
                 on_bytes: Callable[[int, int], None] | None = None) -> Downloaded:
        """Stream the artifact's tar into `dest` (a directory), verifying its sha256; a bad
        download is deleted and raises ChecksumMismatch. `extract`: unpack it beside (into
        dest/<name>/) and check every file against the server's listing."""
        listing = self._get(f"/v1/artifacts/{artifact_id}/files")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with self._http.stream("GET", f"/v1/artifacts/{artifact_id}/download") as r:
            if not r.is_success:
                r.read()
                self._check(r)
            header = r.headers.get("x-checksum-sha256", "")
            total = int(r.headers.get("content-length", 0))
            name = _filename(r.headers.get("content-disposition", ""), artifact_id)
            target = dest / name
            tmp = target.with_name(f".{name}.part")
            h, seen = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    seen += len(chunk)
                    if on_bytes is not None:
                        on_bytes(seen, total)
        digest = h.hexdigest()
        expected = {header, listing["archive_sha256"]}
        if expected != {digest} or (total and seen != total):
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"artifact {artifact_id}: downloaded {seen} bytes with "
                                   f"sha256 {digest}, expected {sorted(expected)} "
                                   f"({total} bytes); nothing was kept")
        tmp.replace(target)
        if not extract:
            return Downloaded(target, digest, seen, 0)
        out = dest / target.stem
        with tarfile.open(target) as tar:
            tar.extractall(out, filter="data")
        checked = 0
        for entry in listing["files"]:
            got = _sha256(out / entry["path"])
            if got != entry["sha256"]:
                raise ChecksumMismatch(f"{entry['path']}: sha256 {got}, listed {entry['sha256']}")
            checked += 1
        return Downloaded(out, digest, seen, checked)

    # -- admin ---------------------------------------------------------------------------
    def keys(self) -> list[dict]:
        return self._get("/v1/keys")

    def create_key(self, label: str | None = None) -> dict:
        return self._post("/v1/keys", {"label": label} if label else {})

    def revoke_key(self, key_id: str) -> None:
        self._delete(f"/v1/keys/{key_id}")

    def status(self) -> dict:
        return self._get("/v1/status")


def wait_ready(server: str, timeout: float = 60.0, alive: Callable[[], bool] | None = None
               ) -> bool:
    """Poll `server`'s /readyz until it answers 200 (True), `timeout` passes or `alive()` says
    the server process is gone (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.rstrip('/')}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if alive is not None and not alive():
            return False
        time.sleep(0.2)
    return False


def _filename(disposition: str, artifact_id: str) -> str:
    """The tar's name from Content-Disposition, reduced to a plain file name."""
    _, _, rest = disposition.partition("filename=")
    name = Path(rest.strip().strip('"')).name
    return name if name.endswith(".tar") and not name.startswith(".") else f"{artifact_id}.tar"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
