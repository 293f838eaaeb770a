"""ORM rows. The schema itself is created only by Alembic (migrations/); these classes describe it.

Profiles (and their per-linear records) and models are shared by every team; jobs, plans and
artifacts belong to one team. Every natural identity has a unique constraint so that writes can
be idempotent upserts (a redelivered task never duplicates rows).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """timestamptz on Postgres; on SQLite (no time zones) naive UTC text. Either way values go
    in converted to UTC (naive ones taken as UTC) and come back aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite would write the wall time and drop the offset: store plain UTC there
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect
                             ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict: JSON, list: JSON, datetime: UTCDateTime()}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"   # by its team; a running one stops at its next progress report


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(StrEnum):
    PROFILE = "profile"
    FIT = "fit"
    PLAN = "plan"          # the solve stage of one plan request
    COMPRESS = "compress"
    PROFILE_SHARD = "profile_shard"   # one block range of a profile job (its parent)


class PlanStatus(StrEnum):
    PENDING = "pending"     # waiting for its profile or its solve
    SOLVED = "solved"


class ArtifactStatus(StrEnum):
    PENDING = "pending"     # its compress job has not finished
    READY = "ready"


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key `bp_<key_id>_<secret>`: only a salted SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class ModelRow(Base):
    """A model the service has seen: where it lives, a fingerprint of its weight files, and its
    layer inventory (from the config alone). Shared by all teams."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    ref: Mapped[str] = mapped_column(String(1000))
    path: Mapped[str] = mapped_column(String(4096))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    weights_hash: Mapped[str | None] = mapped_column(String(128))
    num_linears: Mapped[int] = mapped_column(Integer, default=0)
    linear_params: Mapped[int] = mapped_column(BigInteger, default=0)
    kept_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    inventory: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProfileRow(Base):
    """One profile (unique on its key), shared by all teams. `complete` flips when the whole
    profile has been stored; per-linear records land before that, one by one."""

    __tablename__ = "profiles"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"),
                                                 index=True)
    model_ref: Mapped[str | None] = mapped_column(String(1000))
    weights_hash: Mapped[str | None] = mapped_column(String(128))
    calib_hash: Mapped[str | None] = mapped_column(String(128))
    config: Mapped[dict] = mapped_column(default=dict)
    # what its plans are served by: "native", "gguf" or "compressed-tensors" (the config's
    # "target"; one per key)
    target: Mapped[str] = mapped_column(String(32), default="native", server_default="native")
    fixed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    linear_order: Mapped[list] = mapped_column(default=list)
    block_sensitivity: Mapped[list] = mapped_column(default=list)
    block_proxy: Mapped[list] = mapped_column(default=list)
    stats: Mapped[dict] = mapped_column(default=dict)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class LinearSensitivity(Base):
    __tablename__ = "linear_sensitivities"
    __table_args__ = (UniqueConstraint("profile_id", "linear"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    profile_id: Mapped[str] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    linear: Mapped[str] = mapped_column(String(500))
    block: Mapped[int | None] = mapped_column(Integer)
    out_features: Mapped[int] = mapped_column(Integer)
    in_features: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float, default=0.0)
    proxy: Mapped[float] = mapped_column(Float, default=0.0)


class ErrorSamples(Base):
    """The measured (bits, rank, rel_err²) grid of one linear, stored as one JSON list."""

    __tablename__ = "error_samples"
    __table_args__ = (UniqueConstraint("profile_id", "linear"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    profile_id: Mapped[str] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    linear: Mapped[str] = mapped_column(String(500))
    samples: Mapped[list] = mapped_column(default=list)
    n_samples: Mapped[int] = mapped_column(Integer, default=0)


class ErrorModel(Base):
    """The fitted E_i(b, r) of one linear in its serialised form."""

    __tablename__ = "error_models"
    __table_args__ = (UniqueConstraint("profile_id", "linear"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    profile_id: Mapped[str] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    linear: Mapped[str] = mapped_column(String(500))
    fit: Mapped[dict] = mapped_column(default=dict)
    r2: Mapped[float | None] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"),
                                                index=True)   # None: shared (profile jobs)
    created_by_team: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    stage: Mapped[str] = mapped_column(String(100), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(50))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    dedup_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    depends_on: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"),
                                                   index=True)
    # a profile shard's profile job: it assembles the shards' records once all have succeeded
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                                  index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    profile_id: Mapped[str | None] = mapped_column(ForeignKey("profiles.id", ondelete="SET NULL"))
    plan_id: Mapped[str | None] = mapped_column(String(32), index=True)
    artifact_id: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(default=dict)
    result: Mapped[dict] = mapped_column(default=dict)
    history: Mapped[list] = mapped_column(default=list)   # [[stage, iso time], ...]
    worker: Mapped[str | None] = mapped_column(String(200))
    # the in-process owner (service.jobs.owner) of a running job; NULL: a Celery worker's
    owner: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class PlanRow(Base):
    __tablename__ = "plans"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    profile_id: Mapped[str | None] = mapped_column(ForeignKey("profiles.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(String(32))
    budget: Mapped[str] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(20), default="exact")
    target: Mapped[str] = mapped_column(String(32), default="native", server_default="native")
    constraints: Mapped[dict] = mapped_column(default=dict)
    compress: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(20), default=PlanStatus.PENDING)
    budget_bytes: Mapped[int | None] = mapped_column(BigInteger)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    predicted_error: Mapped[float | None] = mapped_column(Float)
    optimality_gap: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict] = mapped_column(default=dict)   # solver.Plan.to_dict()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    solved_at: Mapped[datetime | None] = mapped_column()


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(20), default=ArtifactStatus.PENDING)
    path: Mapped[str | None] = mapped_column(String(4096))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    tensor_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class UiSession(Base):
    """A signed-in dashboard session: the cookie holds a random token, the row only its SHA-256.
    It lives as long as the API key it was opened with (a revoked key ends it) and carries the
    session's CSRF token for the dashboard's forms."""

    __tablename__ = "ui_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)   # sha256 of the cookie token
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"),
                                            index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class WorkerRow(Base):
    """A process that runs jobs (a Celery worker, or an embedded server's in-process pool), as
    its own heartbeat last wrote it: `GET /v1/status` lists those seen recently."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)   # host:pid[:tag]
    kind: Mapped[str] = mapped_column(String(20))                    # celery | inprocess
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list] = mapped_column(default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
