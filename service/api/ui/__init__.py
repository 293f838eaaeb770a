"""The team dashboard under /ui: server-rendered Jinja2 pages plus a little JavaScript (no
build step). Pages read through the JSON API's route functions and forms call the same service
functions, with the same team isolation; see session.py for sign-in and CSRF."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import SESSION_COOKIE
from service.api.ui import actions, pages
from service.api.ui.session import NotSignedIn
from service.db.auth import AuthError, SignedIn, session_user
from service.errors import ServiceError

PREFIX = "/ui"


def _user(request: Request) -> SignedIn | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    try:
        with request.app.state.db.session() as s:
            return session_user(s, token)
    except (AuthError, Exception):   # an error page must render even when the database fails
        return None


def install(app: FastAPI) -> None:
    """Mount the pages, the forms and the static files; errors under /ui render as pages."""
    app.include_router(pages.router)
    app.include_router(actions.router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="ui-static")
    json_service = app.exception_handlers[ServiceError]
    json_http = app.exception_handlers[StarletteHTTPException]

    def on_ui(request: Request) -> bool:
        return request.url.path == PREFIX or request.url.path.startswith(f"{PREFIX}/")

    async def service_error(request: Request, exc: ServiceError) -> Response:
        if not on_ui(request):
            return await json_service(request, exc)
        return pages.error_page(request, exc, _user(request))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not on_ui(request):
            return await json_http(request, exc)
        err = ServiceError(str(exc.detail))
        err.status, err.code = exc.status_code, "not_found" if exc.status_code == 404 else "error"
        return pages.error_page(request, err, _user(request))

    async def not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        return RedirectResponse(f"{PREFIX}/login", status_code=303)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(NotSignedIn, not_signed_in)
