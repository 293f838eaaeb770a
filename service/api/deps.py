"""FastAPI dependencies as `Annotated` aliases: the database, the queue, settings, the team."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.db.auth import AuthError, authenticate, session_user
from service.db.models import Team
from service.db.session import Database
from service.errors import Unauthorized
from service.jobs.queue import Queue
from service.settings import Settings

SESSION_COOKIE = "bitplan_session"   # the dashboard's (service/api/ui/session.py)
SAFE_METHODS = ("GET", "HEAD")
_bearer = HTTPBearer(auto_error=False, description="an API key from `bitplan keys create TEAM`")


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


DbDep = Annotated[Database, Depends(get_db)]
QueueDep = Annotated[Queue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def current_team(request: Request, db: DbDep,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Team:
    challenge = {"WWW-Authenticate": "Bearer"}
    cookie = request.cookies.get(SESSION_COOKIE)
    if creds is None and cookie and request.method in SAFE_METHODS:
        # the dashboard's pages read (poll jobs, show plots, download) with its session cookie;
        # anything that changes state needs the bearer key (or the dashboard's CSRF-checked forms)
        try:
            with db.session() as s:
                return session_user(s, cookie).team
        except AuthError as exc:
            raise Unauthorized(str(exc), headers=challenge) from exc
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing bearer API key (Authorization: Bearer bp_…)",
                           headers=challenge)
    try:
        with db.session() as s:
            return authenticate(s, creds.credentials)
    except AuthError as exc:
        raise Unauthorized(str(exc), headers=challenge) from exc


TeamDep = Annotated[Team, Depends(current_team)]
