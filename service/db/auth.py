"""Teams and API keys. A key is `bp_<key_id>_<secret>`; only a salted SHA-256 of the secret is
stored, looked up by its public `key_id` and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Team, UiSession, utcnow

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
    return authenticate_key(s, token)[0]


def authenticate_key(s: Session, token: str) -> tuple[Team, ApiKey]:
    """The team and the key row of a bearer key (AuthError when unknown or revoked)."""
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
    return team, row


def revoke_key(s: Session, key_or_id: str) -> int:
    """Revoke by full key, `key_id`, or row id; returns how many keys were revoked."""
    key_id = parse_key(key_or_id)[0] if key_or_id.startswith(KEY_PREFIX) else key_or_id
    res = s.execute(update(ApiKey)
                    .where((ApiKey.key_id == key_id) | (ApiKey.id == key_id))
                    .where(ApiKey.revoked_at.is_(None))
                    .values(revoked_at=utcnow()))
    return res.rowcount or 0


def list_keys(s: Session, team_id: str) -> list[ApiKey]:
    """A team's keys, newest first (revoked ones too, marked by `revoked_at`); no secrets."""
    return list(s.scalars(select(ApiKey).where(ApiKey.team_id == team_id)
                          .order_by(ApiKey.created_at.desc())))


def revoke_team_key(s: Session, team_id: str, key_or_id: str) -> ApiKey | None:
    """Revoke one of `team_id`'s keys (by row id or public key id); None when the team has no
    such key (another team's key is as unknown as a missing one). Its UI sessions end too."""
    row = s.scalar(select(ApiKey).where(ApiKey.team_id == team_id,
                                        (ApiKey.id == key_or_id) | (ApiKey.key_id == key_or_id)))
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    s.execute(delete(UiSession).where(UiSession.api_key_id == row.id))
    return row


# --- dashboard sessions -------------------------------------------------------------------

SESSION_TTL = timedelta(hours=12)


@dataclass(frozen=True)
class SignedIn:
    team: Team
    csrf: str
    api_key_id: str


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(s: Session, api_key: str) -> tuple[str, SignedIn]:
    """Sign in with an API key: returns the cookie token (only its hash is stored) and who is
    signed in. AuthError for an unknown or revoked key."""
    team, key = authenticate_key(s, api_key)
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    s.add(UiSession(id=_token_hash(token), team_id=team.id, api_key_id=key.id, csrf=csrf,
                    expires_at=utcnow() + SESSION_TTL))
    s.flush()
    return token, SignedIn(team, csrf, key.id)


def session_user(s: Session, token: str) -> SignedIn:
    """Who a session cookie belongs to: AuthError when it is unknown, expired, or its key has
    been revoked since."""
    if not token or len(token) > 200:
        raise AuthError("not signed in")
    row = s.get(UiSession, _token_hash(token))
    if row is None or row.expires_at <= utcnow():
        raise AuthError("not signed in (or the session expired)")
    key = s.get(ApiKey, row.api_key_id)
    team = s.get(Team, row.team_id)
    if key is None or key.revoked_at is not None or team is None:
        raise AuthError("the API key of this session was revoked")
    return SignedIn(team, row.csrf, key.id)


def close_session(s: Session, token: str) -> None:
    s.execute(delete(UiSession).where(UiSession.id == _token_hash(token)))
