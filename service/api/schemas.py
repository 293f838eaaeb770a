"""Request and response bodies (pydantic), kept apart from the ORM rows."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.jobs.submit import PlanRequest
from solver.budget import MAX_BUDGET_BYTES
from solver.constraints import Constraints, validate_constraints

Method = Literal["exact", "cpsat", "greedy"]
Target = Literal["native", "gguf", "compressed-tensors"]   # solver.bytes.TARGETS


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ConstraintsIn(BaseModel):
    """Solver constraints, field for field `solver.Constraints` (globs use fnmatch): bit bounds,
    pins (option fields, 16 bits = kept in fp16), allowed ranks, ties. The solver's own validator
    checks them (one validator); the globs are checked against the model's linears at submit."""

    model_config = ConfigDict(extra="allow")   # unknown keys reach the validator, which names them

    min_bits: int | dict[str, int] | None = None
    max_bits: int | dict[str, int] | None = None
    pinned: dict[str, dict[str, Any]] | None = None
    allowed_ranks: list[int] | dict[str, list[int]] | None = None
    ties: list[str] | list[list[str]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _solver_validates(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("constraints must be an object")
        validate_constraints(data)
        return data

    def to_solver(self) -> Constraints:
        return Constraints.from_dict(self.model_dump(exclude_none=True))


class PlanCreate(BaseModel):
    """A plan request: which model, how many bytes, and how to solve. Strict: "yes" is not
    true and "5" is not 5 (a typo must not start a compress job)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "bitplan-demo", "budget": "3.25bpp"}]})

    model: str = Field(min_length=1, max_length=500,
                       description="a model name or path under the server's model roots")
    budget: str | int | float = Field(
        description='bytes ("1.2GB", "850MiB", 123456789), bits per parameter ("3.25bpp", '
                    'over every parameter: the embedding, head and norms too) or a fraction '
                    'of the whole model at fp16 ("0.22x"); every stored byte counts')
    constraints: ConstraintsIn | None = Field(default=None, description="solver constraints")
    method: Method = "exact"
    compress: bool = False
    target: Target = Field(default="native", description='what serves the plan: "native" (the '
                           'CALDERA format, bitplan\'s runtime), "gguf" (a llama.cpp type per '
                           'tensor, written as model.gguf) or "compressed-tensors" (a vLLM '
                           'scheme per module, written as a model directory, L·R as a LoRA '
                           'adapter); a model has one profile per target')

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_type(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("budget must be a string or a number, not a boolean")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | int | float) -> str:
        if isinstance(v, int | float):
            if not math.isfinite(v) or v <= 0:
                raise ValueError("a numeric budget must be a positive, finite number of bytes")
            if v > MAX_BUDGET_BYTES:
                raise ValueError(f"a numeric budget must be at most {MAX_BUDGET_BYTES} bytes "
                                 "(1 PiB)")
            if isinstance(v, float) and not v.is_integer():
                raise ValueError("a numeric budget is a whole number of bytes")
            return str(int(v))
        v = v.strip()
        if not v or len(v) > 100:
            raise ValueError("budget must be 1-100 characters")
        return v

    def to_request(self) -> PlanRequest:
        """The validated request as the typed object service.jobs.submit takes."""
        constraints = None if self.constraints is None \
            else self.constraints.model_dump(exclude_none=True)
        return PlanRequest(model=self.model, budget=self.budget, method=self.method,
                           constraints=constraints, compress=self.compress, target=self.target)


class PlanAccepted(BaseModel):
    plan_id: str
    job_id: str
    profile_job_id: str | None = None
    status: str
    links: dict[str, str]


class JobPublic(BaseModel):
    id: str
    kind: str
    status: str
    stage: str
    progress: float
    attempts: int
    error: ErrorBody | None = None
    waiting_on: str | None = None
    plan_id: str | None = None
    profile_id: str | None = None
    artifact_id: str | None = None
    result: dict[str, Any] = {}
    history: list[list[str]] = []
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: dict[str, str] = {}


class ModelRef(BaseModel):
    id: str
    ref: str


class PlanPublic(BaseModel):
    id: str
    status: str
    model: ModelRef
    budget: str
    method: str
    constraints: dict[str, Any]
    target: str = "native"
    budget_bytes: int | None = None
    total_bytes: int | None = None
    predicted_error: float | None = None
    optimality_gap: float | None = None
    notes: list[str] = Field(default=[], description="what to know about the solved plan, e.g. "
                             "a budget above the largest useful plan")
    linears: list[dict[str, Any]] = []
    plan: dict[str, Any] = {}
    job_id: str | None = None
    profile_id: str | None = None
    created_at: datetime
    solved_at: datetime | None = None
    links: dict[str, str] = {}


class PlanSummary(BaseModel):
    id: str
    status: str
    model_id: str
    budget: str
    target: str = "native"
    total_bytes: int | None = None
    predicted_error: float | None = None
    job_id: str | None = None
    created_at: datetime
    links: dict[str, str] = {}


class FrontierPoint(BaseModel):
    bytes: int
    error: float


class FrontierPublic(BaseModel):
    plan_id: str
    points: list[FrontierPoint]
    chosen: FrontierPoint | None = None


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=500)


class ModelPublic(BaseModel):
    id: str
    ref: str
    num_linears: int
    linear_params: int
    kept_bytes: int
    weights_hash: str | None = None
    profile_id: str | None = None
    profiled: bool
    profiled_at: datetime | None = None
    created_at: datetime
    links: dict[str, str] = {}


class ProfileLinear(BaseModel):
    name: str
    block: int | None
    out_features: int
    in_features: int
    alpha: float
    proxy: float
    n_samples: int
    fit_r2: float | None = None


class ProfilePublic(BaseModel):
    id: str
    key: str
    model_id: str | None
    complete: bool
    fixed_bytes: int
    block_sensitivity: list[float]
    block_proxy: list[float]
    stats: dict[str, Any]
    linears: list[ProfileLinear]
    links: dict[str, str] = {}


class Feasibility(BaseModel):
    model_id: str
    min_bytes: int
    max_bytes: int
    source: Literal["profile", "inventory"]
    target: str = "native"


class ArtifactPublic(BaseModel):
    id: str
    plan_id: str
    job_id: str | None
    status: str
    bytes: int | None = None
    tensor_bytes: int | None = None
    sha256: str | None = None
    metrics: dict[str, Any] = {}
    created_at: datetime
    finished_at: datetime | None = None
    links: dict[str, str] = {}


class ArtifactFile(BaseModel):
    path: str            # inside the downloaded archive
    bytes: int
    sha256: str


class ArtifactFiles(BaseModel):
    artifact_id: str
    archive_sha256: str  # of the download's bytes (also its X-Checksum-SHA256 header)
    archive_bytes: int
    files: list[ArtifactFile]


class CompressAccepted(BaseModel):
    artifact_id: str
    job_id: str
    links: dict[str, str]


class JobCancelled(BaseModel):
    job_id: str
    status: Literal["cancelled"] = "cancelled"
    was: str = Field(description="its status when cancelled: a running job stops at its next "
                                 "linear (or progress report), a queued one never starts")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    label: str | None = Field(default=None, max_length=200)


class KeyPublic(BaseModel):
    id: str
    key_id: str = Field(description="the public part of the key: bp_<key_id>_…")
    label: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class KeyCreated(KeyPublic):
    key: str = Field(description="the full bearer key; shown this once, never stored")


class QueueStatus(BaseModel):
    queued: int
    running: int
    mine_queued: int = Field(description="of those queued, your team's")
    mine_running: int


class WorkerPublic(BaseModel):
    id: str
    kind: str
    host: str
    queues: list[str]
    seen_at: datetime
    age_s: float


class ServiceStatus(BaseModel):
    queues: dict[str, QueueStatus]
    workers: list[WorkerPublic] = Field(description="processes whose heartbeat was seen within "
                                                    "`window_s`")
    window_s: float
