"""Dashboard sign-in: an API key is exchanged once for a session cookie (HttpOnly, SameSite=
Strict, Secure when served over https) holding a random token whose SHA-256 is the session row
(service.db.auth). Every form carries the session's CSRF token (a synchronizer token checked in
constant time), and a state-changing request whose Origin names another site is refused."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Depends, Request

from service.api.deps import SESSION_COOKIE, DbDep
from service.db.auth import AuthError, SignedIn, session_user
from service.errors import ServiceError

MAX_FORM_BYTES = 64_000


class NotSignedIn(Exception):
    """Raised by page dependencies; answered with a redirect to the sign-in page."""


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


def signed_in(request: Request, db: DbDep) -> SignedIn:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise NotSignedIn
    try:
        with db.session() as s:
            return session_user(s, token)
    except AuthError as exc:
        raise NotSignedIn from exc


UserDep = Annotated[SignedIn, Depends(signed_in)]


def set_session_cookie(response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")


def check_origin(request: Request) -> None:
    """Browsers send Origin on every POST; one from another site is a forged request."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
        raise Forbidden("cross-site form submission refused", code="bad_origin")


async def read_form(request: Request) -> dict[str, list[str]]:
    """The url-encoded form body, as lists of values (no multipart: the forms send none)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden("form too large", code="payload_too_large")
    out: dict[str, list[str]] = {}
    for k, v in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        out.setdefault(k, []).append(v)
    return out


async def checked_form(request: Request, user: SignedIn) -> dict[str, str]:
    """The form of a signed-in user's POST, once its Origin and CSRF token check out."""
    check_origin(request)
    form = await read_form(request)
    token = (form.get("csrf") or [""])[0]
    if not hmac.compare_digest(token.encode(), user.csrf.encode()):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page",
                        code="bad_csrf")
    return {k: v[-1] for k, v in form.items()}
