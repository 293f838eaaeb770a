"""One settings object for the whole service, read from BITPLAN_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "bitplan-demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BITPLAN_", extra="ignore")

    data_dir: Path = Field(default=REPO_ROOT / "var", description="profiles, artifacts, SQLite")
    database_url: str | None = Field(default=None, description="default: SQLite under data_dir")
    redis_url: str | None = Field(default=None, description="unset = in-process queue")
    model_roots: list[Path] = Field(default_factory=lambda: [REPO_ROOT / "models"])
    trust_remote_code: bool = False
    device: str = "cpu"
    eval_seq_len: int = 256
    eval_seqs: int = 96
    require_services: bool = False
    # service / queue
    redis_prefix: str = Field(default="bitplan:", description="prefix of every broker key")
    visibility_timeout_s: int = Field(default=3600, description="unacked task redelivery")
    inprocess_workers: int = Field(default=2, description="threads of the in-process queue")
    max_body_bytes: int = Field(default=1_000_000, description="largest accepted request body")
    max_concurrent_jobs_per_team: int = Field(default=8, description="queued + running plan and "
                                              "compress jobs a team may have at once (429 over)")
    job_lease_s: float = Field(default=20.0, description="a running job whose heartbeat (sent "
                               "every lease/4) is older than this may be claimed again (its "
                               "worker died)")
    sweep_interval_s: float = Field(default=5.0, description="how often the API (or embedded "
                                    "server) re-sends jobs nobody runs (0 = never)")
    requeue_after_s: float = Field(default=300.0, description="a queued job this old whose "
                                   "message may be lost (a broker restart) is sent again")
    worker_heartbeat_file: Path | None = Field(
        default=None, description="a Celery worker touches this file while its consumer loop "
        "runs; `bitplan worker-health` checks its age (unset = no heartbeat)")
    worker_heartbeat_s: float = Field(default=10.0, gt=0, description="seconds between beats")
    profile_config: dict = Field(default_factory=dict,
                                 description="overrides of compressor.pipeline.profile.ProfileConfig")
    profile_shards: int = Field(default=0, ge=0, description="block-range shards a profile "
                                "splits into (0 = one per live `gpu` worker, 1 in embedded mode)")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'bitplan.sqlite3'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
