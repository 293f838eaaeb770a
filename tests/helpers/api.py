"""Service settings for tests, a queue that only records, and apps with teams and keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from service.api import create_app
from service.db.auth import create_key, create_team
from service.db.session import get_database
from service.settings import Settings


def make_settings(tmp: Path, db_url: str, *, redis_url: str | None = None,
                  model_roots: list[Path] | None = None, **extra) -> Settings:
    # one profile shard unless a test asks for more: the automatic count follows the workers
    # seen alive, and other tests' workers share the session's Postgres
    extra.setdefault("profile_shards", 1)
    return Settings(data_dir=tmp, database_url=db_url, redis_url=redis_url,
                    model_roots=model_roots or [], redis_prefix=f"bitplan-test-{uuid.uuid4().hex}:",
                    **extra)


class RecordingQueue:
    """Records what the API enqueues, for tests of the API alone (the queue has its own)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def enqueue(self, task_name: str, job_id: str) -> None:
        self.sent.append((task_name, job_id))

    def fan_out(self, header: list[tuple[str, str]], body: tuple[str, str]) -> None:
        self.sent.extend([*header, body])

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class ApiEnv:
    client: TestClient
    settings: Settings
    db: object
    keys: dict[str, str]          # team name -> bearer key
    queue: object

    def h(self, team: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}


def make_env(settings: Settings, queue=None, teams=("alpha", "beta")) -> ApiEnv:
    db = get_database(settings.resolved_database_url)
    keys = {}
    with db.session() as s:
        for name in teams:
            team = create_team(s, f"{name}-{uuid.uuid4().hex[:6]}")
            keys[name] = create_key(s, team)[1]
    app = create_app(settings, queue=queue)
    client = TestClient(app, raise_server_exceptions=False)
    return ApiEnv(client, settings, db, keys, app.state.queue)


def env_with_cached_profile(tmp: Path, db_url: str, model_root: Path, model_ref: str = "tiny-qwen"):
    """An API env whose model `model_ref` already has a profile built from numbers
    (tests.helpers.profiles.synthetic_profile): plans solve without profiling. Returns
    (env, model row); close `env.queue` when done."""
    from service.db.profile_store import DbProfileStore
    from service.jobs.submit import resolve_and_register
    from tests.helpers.profiles import synthetic_profile

    settings = make_settings(tmp, db_url, model_roots=[model_root])
    env = make_env(settings)
    model = resolve_and_register(env.db, model_ref, settings)
    prof = synthetic_profile()
    store = DbProfileStore(env.db)
    store.put(prof)
    store.link_model(prof.key, model.id)
    return env, model
