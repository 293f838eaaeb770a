"""A real `bitplan serve` (uvicorn, embedded mode: SQLite + in-process jobs) on a free port, for
tests that talk to it over HTTP (the browser tests, `bitplan remote`). Teams and keys are made
in its database before it starts; starting, waiting and stopping (only this process) are
service.server_process's, as the benchmarks' servers are."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.db.auth import create_key, create_team
from service.db.migrate import upgrade
from service.db.session import get_database
from service.server_process import serve_subprocess
from tests.helpers.paths import REPO
from tests.helpers.profiles import TINY_PROFILE


@dataclass
class LiveServer:
    url: str
    keys: dict[str, str]     # team label -> bearer key
    teams: dict[str, str]    # team label -> team name
    env: dict[str, str]      # the server's environment (BITPLAN_*), for CLI subprocesses
    log: Path


def server_env(data_dir: Path, model_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITPLAN_")}
    env.update({"BITPLAN_DATA_DIR": str(data_dir),
                "BITPLAN_MODEL_ROOTS": json.dumps([str(model_root)]),
                "BITPLAN_PROFILE_CONFIG": json.dumps(TINY_PROFILE),
                "BITPLAN_EVAL_SEQS": "4", "BITPLAN_EVAL_SEQ_LEN": "64",
                "BITPLAN_WORKER_HEARTBEAT_S": "2",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


@contextmanager
def live_server(data_dir: Path, model_root: Path, teams: tuple[str, ...] = ("alpha", "beta"),
                start_timeout: float = 90.0) -> Iterator[LiveServer]:
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data_dir / 'bitplan.sqlite3'}"
    upgrade(url)
    keys, names = {}, {}
    with get_database(url).session() as s:
        for label in teams:
            team = create_team(s, f"{label}-{uuid.uuid4().hex[:6]}")
            names[label] = team.name
            keys[label] = create_key(s, team, f"{label} test key")[1]
    env = server_env(data_dir, model_root)
    log = data_dir / "server.log"
    with serve_subprocess(env, log=log, start_timeout=start_timeout, cwd=REPO) as srv:
        yield LiveServer(srv.url, keys, names, env, log)
