"""Shared test builders, one home for each: paths (repo, demo model), models (tiny causal LMs
and tokenizers), profiles (synthetic profiles, small profile configs), backends (the shared
Postgres/Redis and private databases), net (ports, a cuttable TCP proxy, a private
redis-server), api (settings, apps with teams and keys), flow (the end-to-end plan flow) and
fixtures (the pytest fixtures, registered once from tests/conftest.py)."""
