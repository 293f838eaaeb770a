"""The dashboard's pages (GET). Every page reads through the JSON API's own route functions
(service/api/routes), with the signed-in team, so a page shows exactly what that team's API key
would see — another team's plan, job or artifact is a 404 here too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from service.api.deps import DbDep, SettingsDep
from service.api.routes import admin, artifacts, jobs, models, plans
from service.api.schemas import ArtifactPublic, PlanPublic
from service.api.ui import views
from service.api.ui.session import UserDep
from service.db.auth import SignedIn, list_keys
from service.db.models import Artifact, ModelRow
from service.db.profile_store import DbProfileStore
from service.db.session import Database
from service.errors import Invalid, NotFound, ServiceError
from service.jobs import planning
from service.jobs.submit import latest_profile_id

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters["bytes"] = views.human_bytes
templates.env.filters["kind"] = views.short_kind
MAX_COMPARE = 6


def render(request: Request, name: str, user: SignedIn | None, status_code: int = 200,
           **ctx: object) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": user, **ctx},
                                      status_code=status_code)


@router.get("", response_class=RedirectResponse)
@router.get("/", response_class=RedirectResponse)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/models", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", None)


def model_ranges(db: Database, model_ids: list[str]) -> dict[str, views.BudgetRange]:
    """Each model's feasible budget range, from the feasibility endpoint's own computation."""
    out = {}
    for mid in model_ids:
        with db.session() as s:
            inventory = s.get(ModelRow, mid).inventory
        f = models.get_feasibility(mid, None, db)
        out[mid] = views.budget_range(inventory, f.min_bytes, f.max_bytes, f.source)
    return out


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, user: UserDep, db: DbDep) -> HTMLResponse:
    rows = models.list_models(user.team, db)
    return render(request, "models.html", user, models=rows,
                  ranges=model_ranges(db, [m.id for m in rows]))


def team_plans(db: Database, user: SignedIn, model_id: str | None = None) -> list:
    return [p for p in plans.list_plans(user.team, db, limit=500)
            if model_id is None or p.model_id == model_id]


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(model_id: str, request: Request, user: UserDep, db: DbDep) -> HTMLResponse:
    model = models.get_model(model_id, user.team, db)
    profile = models.get_profile(model_id, user.team, db) if model.profiled else None
    return render(request, "model.html", user, model=model, profile=profile,
                  range=model_ranges(db, [model_id])[model_id],
                  plans=team_plans(db, user, model_id))


@router.get("/models/{model_id}/frontier.png", response_class=Response)
def model_frontier_png(model_id: str, user: UserDep, db: DbDep) -> Response:
    """The model's quality-vs-bytes frontier (no constraints) with the team's solved plans."""
    with db.session() as s:
        models.get_model(model_id, user.team, db)
        pid = latest_profile_id(s, model_id)
    profile = DbProfileStore(db).get_by_id(pid) if pid else None
    if profile is None:
        raise NotFound(f"model {model_id} has no profile yet")
    points = planning.frontier_points(profile, None, pid)
    mine = [(p.total_bytes / 2**20, p.predicted_error) for p in team_plans(db, user, model_id)
            if p.total_bytes is not None and p.predicted_error is not None]
    from compressor.research.plots import frontier_png  # matplotlib loads on the first plot

    curves = {"Pareto frontier": [(b / 2**20, e) for b, e in points]}
    if mine:
        curves["your plans"] = mine
    png = frontier_png(curves, "bytes (MiB)", "predicted KL", f"{profile.model_ref}: predicted "
                       "KL vs bytes", logy=True)
    return Response(png, media_type="image/png")


def _artifact_of(db: Database, user: SignedIn, plan_id: str) -> ArtifactPublic | None:
    with db.session() as s:
        art_id = s.scalar(select(Artifact.id).where(Artifact.plan_id == plan_id,
                                                    Artifact.team_id == user.team.id))
    return artifacts.get_artifact(art_id, user.team, db) if art_id else None


@router.get("/plans/new", response_class=HTMLResponse)
def new_plan_page(request: Request, user: UserDep, db: DbDep,
                  model: str | None = None) -> HTMLResponse:
    return new_plan_form(request, user, db, {"model": model or ""})


def new_plan_form(request: Request, user: SignedIn, db: Database, form: dict,
                  error: str | None = None, status: int = 200) -> HTMLResponse:
    rows = models.list_models(user.team, db)
    return render(request, "plan_new.html", user, status_code=status, models=rows,
                  ranges=model_ranges(db, [m.id for m in rows]), form=form, error=error)


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(plan_id: str, request: Request, user: UserDep, db: DbDep) -> HTMLResponse:
    plan: PlanPublic = plans.get_plan(plan_id, user.team, db)
    job = jobs.get_job(plan.job_id, user.team, db) if plan.job_id else None
    art = _artifact_of(db, user, plan_id)
    compress_job = jobs.get_job(art.job_id, user.team, db) if art and art.job_id else None
    return render(request, "plan.html", user, plan=plan, job=job, artifact=art,
                  compress_job=compress_job, heatmap=views.heatmap(plan.linears))


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, user: UserDep, db: DbDep,
                 plan: Annotated[list[str], Query()] = []) -> HTMLResponse:  # noqa: B006
    ids = list(dict.fromkeys(plan))
    if not 2 <= len(ids) <= MAX_COMPARE:
        raise Invalid(f"pick 2 to {MAX_COMPARE} plans to compare (got {len(ids)})")
    chosen = [plans.get_plan(pid, user.team, db) for pid in ids]
    if len({p.model.id for p in chosen}) > 1:
        raise Invalid("compare plans of one model")
    arts = {p.id: _artifact_of(db, user, p.id) for p in chosen}
    names = list(dict.fromkeys(li["name"] for p in chosen for li in p.linears))
    per_linear = {p.id: {li["name"]: li for li in p.linears} for p in chosen}
    return render(request, "compare.html", user, plans=chosen, artifacts=arts, names=names,
                  per_linear=per_linear)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, user: UserDep, db: DbDep,
              settings: SettingsDep) -> HTMLResponse:
    return render(request, "jobs.html", user, jobs=jobs.list_jobs(user.team, db, None, 200),
                  status=admin.service_status(db, settings, user.team.id))


@router.get("/team", response_class=HTMLResponse)
def team_page(request: Request, user: UserDep, db: DbDep) -> HTMLResponse:
    return team_view(request, user, db)


def team_view(request: Request, user: SignedIn, db: Database, new_key: str | None = None
              ) -> HTMLResponse:
    with db.session() as s:
        keys = [admin.key_public(k) for k in list_keys(s, user.team.id)]
    return render(request, "team.html", user, keys=keys, new_key=new_key)


def error_page(request: Request, exc: ServiceError, user: SignedIn | None) -> HTMLResponse:
    return render(request, "error.html", user, status_code=exc.status, code=exc.code,
                  message=exc.message)
