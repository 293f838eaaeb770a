"""Teams and API keys: hashed at rest, constant-time check, revocation; the admin commands."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from service.db.auth import AuthError, authenticate, create_key, create_team, revoke_key
from service.db.models import ApiKey
from service.db.session import get_database


def test_keys_hashed_and_revocable(db_url):
    db = get_database(db_url)
    with db.session() as s:
        team = create_team(s, name := f"team-{uuid.uuid4().hex[:8]}")
        row, key = create_key(s, team, "ci")
    with db.session() as s:
        stored = s.scalars(sa.select(ApiKey)).all()
        blob = " ".join(f"{r.key_id} {r.salt} {r.secret_hash}" for r in stored)
        secret = key.split("_", 2)[2]
        assert secret not in blob and key not in blob
        assert authenticate(s, key).id == team.id
        for bad in ("", "bp_", "bp_nokey", key + "x", key.replace(row.key_id, "0" * 12),
                    "Bearer " + key, "x" * 300):
            with pytest.raises(AuthError):
                authenticate(s, bad)
    with db.session() as s:
        assert revoke_key(s, key) == 1
        assert revoke_key(s, key) == 0
    with db.session() as s, pytest.raises(AuthError):
        authenticate(s, key)
    with db.session() as s, pytest.raises(ValueError, match="already exists"):
        create_team(s, name)


def test_cli_team_and_key_commands(tmp_path, monkeypatch, capsys):
    from service.cli import main
    from service.settings import get_settings

    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["teams", "create", "cli-team"]) == 0
        capsys.readouterr()
        assert main(["keys", "create", "cli-team"]) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("bp_") and len(key) > 30
        db = get_database(get_settings().resolved_database_url)
        with db.session() as s:
            assert authenticate(s, key).name == "cli-team"
        assert main(["keys", "create", "no-such-team"]) == 2
        assert main(["keys", "revoke", key]) == 0
        with db.session() as s, pytest.raises(AuthError):
            authenticate(s, key)
    finally:
        get_settings.cache_clear()
