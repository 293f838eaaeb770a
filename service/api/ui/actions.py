"""The dashboard's forms (POST): each checks Origin and the session's CSRF token, then calls
the same service function as the JSON API (submit_plan, request_compress, cancel_job,
delete_plan, create_key, revoke_team_key) and redirects (post/redirect/get)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from service.api.deps import SESSION_COOKIE, DbDep, QueueDep, SettingsDep
from service.api.schemas import PlanCreate
from service.api.ui import pages
from service.api.ui.session import (
    UserDep,
    check_origin,
    checked_form,
    read_form,
    set_session_cookie,
)
from service.db.auth import SESSION_TTL, AuthError, close_session, create_key, open_session
from service.db.auth import revoke_team_key as revoke_key_of_team
from service.errors import NotFound, ServiceError
from service.jobs.control import cancel_job, delete_plan
from service.jobs.submit import PlanRequest, request_compress, submit_plan

router = APIRouter(prefix="/ui", include_in_schema=False)


def see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, db: DbDep) -> HTMLResponse:
    check_origin(request)
    key = ((await read_form(request)).get("api_key") or [""])[0].strip()
    try:
        with db.session() as s:
            token, _ = open_session(s, key)
    except AuthError:
        return pages.render(request, "login.html", None, status_code=401,
                            error="That API key is unknown or revoked.")
    response = see("/ui/models")
    set_session_cookie(response, request, token, int(SESSION_TTL.total_seconds()))
    return response


@router.post("/logout")
async def logout(request: Request, user: UserDep, db: DbDep) -> RedirectResponse:
    await checked_form(request, user)
    with db.session() as s:
        close_session(s, request.cookies.get(SESSION_COOKIE, ""))
    response = see("/ui/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def plan_request(form: dict[str, str]) -> PlanRequest:
    """The form as a plan request, validated by the JSON API's schema (PlanCreate)."""
    unit = form.get("unit", "")
    budget = form.get("budget", "").strip()
    body: dict = {"model": form.get("model", ""), "budget": f"{budget}{unit}" if unit else budget,
                  "method": form.get("method") or "exact", "compress": "compress" in form,
                  "target": form.get("target") or "native"}
    text = form.get("constraints", "").strip()
    if text:
        try:
            body["constraints"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"constraints are not valid JSON: {exc.msg} (line {exc.lineno})"
                             ) from exc
    return PlanCreate.model_validate(body).to_request()


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: "
                         f"{str(e['msg']).removeprefix('Value error, ')}"
                         for e in exc.errors()[:5])
    return exc.message if isinstance(exc, ServiceError) else str(exc)


@router.post("/plans", response_class=HTMLResponse)
async def create_plan(request: Request, user: UserDep, db: DbDep, queue: QueueDep,
                      settings: SettingsDep) -> HTMLResponse:
    form = await checked_form(request, user)
    try:
        sub = submit_plan(db, queue, settings, user.team.id, plan_request(form))
    except (ValueError, ServiceError) as exc:   # bad budget, infeasible, bad constraints, 429
        status = exc.status if isinstance(exc, ServiceError) else 422
        return pages.new_plan_form(request, user, db, form, error=_message(exc), status=status)
    return see(f"/ui/plans/{sub.plan_id}")


@router.post("/plans/{plan_id}/compress")
async def compress(plan_id: str, request: Request, user: UserDep, db: DbDep, queue: QueueDep,
                   settings: SettingsDep) -> RedirectResponse:
    await checked_form(request, user)
    request_compress(db, queue, user.team.id, plan_id, settings)
    return see(f"/ui/plans/{plan_id}")


@router.post("/plans/{plan_id}/delete")
async def remove_plan(plan_id: str, request: Request, user: UserDep, db: DbDep,
                      settings: SettingsDep) -> RedirectResponse:
    await checked_form(request, user)
    delete_plan(db, settings, user.team.id, plan_id)
    return see("/ui/models")


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request, user: UserDep, db: DbDep) -> RedirectResponse:
    form = await checked_form(request, user)
    cancel_job(db, user.team.id, job_id)
    back = form.get("next", "")
    return see(back if back.startswith("/ui/") else "/ui/jobs")


@router.post("/team/keys", response_class=HTMLResponse)
async def new_key(request: Request, user: UserDep, db: DbDep) -> HTMLResponse:
    form = await checked_form(request, user)
    label = form.get("label", "").strip()[:200] or None
    with db.session() as s:
        _, plaintext = create_key(s, user.team, label)
    return pages.team_view(request, user, db, new_key=plaintext)   # shown this once


@router.post("/team/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, user: UserDep, db: DbDep
                     ) -> RedirectResponse:
    await checked_form(request, user)
    with db.session() as s:
        if revoke_key_of_team(s, user.team.id, key_id) is None:
            raise NotFound(f"key {key_id} not found")
    # revoking the key this session signed in with ends the session: the next page asks again
    return see("/ui/team")
