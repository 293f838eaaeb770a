"""Teams and API keys. A key is `bp_<key_id>_<secret>`; only a salted SHA-256 of the secret is
stored, looked up by its public `key_id` and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Team, utcnow

KEY_PREFIX = "bp_"


class AuthError(Exception):
    """Unknown, malformed or revoked key."""


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def create_team(s: Session, name: str) -> Team:
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("team name must be 1-100 characters")
    if s.scalar(select(Team.id).where(Team.name == name)) is not None:
        raise ValueError(f"team {name!r} already exists")
    team = Team(name=name)
    try:
        with s.begin_nested():
            s.add(team)
    except IntegrityError as exc:   # created concurrently
        raise ValueError(f"team {name!r} already exists") from exc
    return team


def find_team(s: Session, name_or_id: str) -> Team | None:
    return s.scalar(select(Team).where((Team.name == name_or_id) | (Team.id == name_or_id)))


def create_key(s: Session, team: Team, label: str | None = None) -> tuple[ApiKey, str]:
    """Returns the row and the plaintext key, which is shown once and never stored."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = ApiKey(team_id=team.id, key_id=key_id, salt=salt, secret_hash=_hash(salt, secret),
                 label=label)
    s.add(row)
    s.flush()
    return row, f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(token: str) -> tuple[str, str]:
    if not token.startswith(KEY_PREFIX):
        raise AuthError("malformed API key")
    key_id, sep, secret = token[len(KEY_PREFIX):].partition("_")
    if not sep or not key_id or not secret or len(token) > 200:
        raise AuthError("malformed API key")
    return key_id, secret


def authenticate(s: Session, token: str) -> Team:
    key_id, secret = parse_key(token)
    row = s.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    # Hash even when the key id is unknown, so timing does not tell which ids exist.
    salt = row.salt if row is not None else "00" * 16
    expected = row.secret_hash if row is not None else "0" * 64
    ok = hmac.compare_digest(_hash(salt, secret), expected)
    if row is None or not ok or row.revoked_at is not None:
        raise AuthError("invalid or revoked API key")
    team = s.get(Team, row.team_id)
    if team is None:
        raise AuthError("invalid or revoked API key")
    return team


def revoke_key(s: Session, key_or_id: str) -> int:
    """Revoke by full key, `key_id`, or row id; returns how many keys were revoked."""
    key_id = parse_key(key_or_id)[0] if key_or_id.startswith(KEY_PREFIX) else key_or_id
    res = s.execute(update(ApiKey)
                    .where((ApiKey.key_id == key_id) | (ApiKey.id == key_id))
                    .where(ApiKey.revoked_at.is_(None))
                    .values(revoked_at=utcnow()))
    return res.rowcount or 0
