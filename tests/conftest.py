"""Test-session setup: offline Hugging Face, and the shared fixtures (tests/helpers/fixtures.py)
registered once here — pytest only honours `pytest_plugins` in the root conftest. Postgres/Redis
tests skip when the services are unreachable, unless BITPLAN_REQUIRE_SERVICES=1 (CI), where an
unreachable service is a failure."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.helpers.fixtures"]
