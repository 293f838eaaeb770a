"""The shared Postgres and Redis: their URLs, a reachability check that skips (or, with
BITPLAN_REQUIRE_SERVICES=1 as in CI, fails) when one is down, and private Postgres databases
created and dropped here (the shared server itself is never touched)."""

from __future__ import annotations

import os
import socket

import pytest

from service.db.scratch import create_pg_database, drop_pg_database  # noqa: F401 (re-exported)

POSTGRES_URL = os.environ.get("BITPLAN_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BITPLAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    if reachable(host, port):
        return
    msg = f"{name} not reachable at {host}:{port}"
    if os.environ.get("BITPLAN_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " (BITPLAN_REQUIRE_SERVICES=1)")
    pytest.skip(msg + "; set BITPLAN_REQUIRE_SERVICES=1 to make this a failure")
