"""Shared fixtures. Postgres/Redis tests skip when the services are unreachable, unless
BITPLAN_REQUIRE_SERVICES=1 (CI), where an unreachable service is a failure."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "bitplan-demo"
POSTGRES_URL = os.environ.get("BITPLAN_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BITPLAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _require(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    msg = f"{name} not reachable at {host}:{port}"
    if os.environ.get("BITPLAN_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " (BITPLAN_REQUIRE_SERVICES=1)")
    pytest.skip(msg + "; set BITPLAN_REQUIRE_SERVICES=1 to make this a failure")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    _require("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    _require("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.fail(f"demo model missing at {DEMO_MODEL}; train it with `bitplan train-demo`")
    return DEMO_MODEL
