"""Plans: create (202 + job), read, recipe YAML, frontier, plot; request compression."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import DbDep, QueueDep, SettingsDep, TeamDep
from service.api.schemas import (
    CompressAccepted,
    FrontierPoint,
    FrontierPublic,
    ModelRef,
    PlanAccepted,
    PlanCreate,
    PlanPublic,
    PlanSummary,
)
from service.db.models import ModelRow, PlanRow, PlanStatus, Team
from service.db.profile_store import DbProfileStore
from service.db.session import Database
from service.errors import Conflict, Invalid, NotFound
from service.jobs import planning
from service.jobs.control import delete_plan
from service.jobs.submit import request_compress, submit_plan
from solver import Plan
from solver.recipes import plan_to_yaml

router = APIRouter(tags=["plans"])
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def team_plan(s: Session, team: Team, plan_id: str) -> PlanRow:
    plan = s.scalar(select(PlanRow).where(PlanRow.id == plan_id, PlanRow.team_id == team.id))
    if plan is None:
        raise NotFound(f"plan {plan_id} not found")
    return plan


def _solved(s: Session, team: Team, plan_id: str) -> PlanRow:
    plan = team_plan(s, team, plan_id)
    if plan.status != PlanStatus.SOLVED:
        raise Conflict(f"plan {plan_id} is not solved yet (status {plan.status}); poll its job",
                       code="plan_not_ready")
    return plan


@router.post("/plans", status_code=202, response_model=PlanAccepted,
             responses={409: {"description": "idempotency key reused with another body"}})
def create_plan(body: PlanCreate, team: TeamDep, db: DbDep, queue: QueueDep,
                settings: SettingsDep, idempotency_key: IdemKey = None) -> JSONResponse:
    if idempotency_key is not None and not idempotency_key.strip():
        raise Invalid("Idempotency-Key must not be blank")
    sub = submit_plan(db, queue, settings, team.id, body.to_request(), idempotency_key)
    out = PlanAccepted(plan_id=sub.plan_id, job_id=sub.job_id, profile_job_id=sub.profile_job_id,
                       status="queued",
                       links={"job": f"/v1/jobs/{sub.job_id}", "plan": f"/v1/plans/{sub.plan_id}"})
    return JSONResponse(out.model_dump(), status_code=202 if sub.created else 200,
                        headers={"Location": f"/v1/jobs/{sub.job_id}"})


@router.get("/plans", response_model=list[PlanSummary])
def list_plans(team: TeamDep, db: DbDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
               ) -> list[PlanSummary]:
    """This team's plans, newest first."""
    with db.session() as s:
        rows = s.scalars(select(PlanRow).where(PlanRow.team_id == team.id)
                         .order_by(PlanRow.created_at.desc()).limit(limit)).all()
        return [PlanSummary(id=p.id, status=p.status, model_id=p.model_id, budget=p.budget,
                            target=p.target, total_bytes=p.total_bytes, predicted_error=p.predicted_error,
                            job_id=p.job_id, created_at=p.created_at,
                            links={"self": f"/v1/plans/{p.id}"}) for p in rows]


@router.get("/plans/{plan_id}", response_model=PlanPublic)
def get_plan(plan_id: str, team: TeamDep, db: DbDep) -> PlanPublic:
    with db.session() as s:
        plan = team_plan(s, team, plan_id)
        model = s.get(ModelRow, plan.model_id)
        links = {"self": f"/v1/plans/{plan.id}", "job": f"/v1/jobs/{plan.job_id}",
                 "model": f"/v1/models/{plan.model_id}"}
        if plan.status == PlanStatus.SOLVED:
            links |= {"recipe": f"/v1/plans/{plan.id}/recipe.yaml",
                      "frontier": f"/v1/plans/{plan.id}/frontier",
                      "plot": f"/v1/plans/{plan.id}/plot.png",
                      "compress": f"/v1/plans/{plan.id}/compress"}
        return PlanPublic(
            id=plan.id, status=plan.status, model=ModelRef(id=model.id, ref=model.ref),
            budget=plan.budget, method=plan.method, constraints=plan.constraints or {},
            target=plan.target,
            budget_bytes=plan.budget_bytes, total_bytes=plan.total_bytes,
            predicted_error=plan.predicted_error, optimality_gap=plan.optimality_gap,
            notes=list((plan.result or {}).get("notes") or []),
            linears=planning.linear_table(Plan.from_dict(plan.result)) if plan.result else [], plan=plan.result or {},
            job_id=plan.job_id, profile_id=plan.profile_id, created_at=plan.created_at,
            solved_at=plan.solved_at, links=links)


@router.get("/plans/{plan_id}/recipe.yaml", response_class=Response,
            responses={200: {"content": {"application/yaml": {}}}})
def get_recipe(plan_id: str, team: TeamDep, db: DbDep) -> Response:
    with db.session() as s:
        result = _solved(s, team, plan_id).result
    return Response(plan_to_yaml(Plan.from_dict(result)), media_type="application/yaml",
                    headers={"Content-Disposition": f'inline; filename="{plan_id}.yaml"'})


def _frontier(db: Database, team: Team, plan_id: str) -> FrontierPublic:
    with db.session() as s:
        plan = _solved(s, team, plan_id)
        constraints, profile_id = plan.constraints, plan.profile_id
        total, err = plan.total_bytes, plan.predicted_error
    profile = DbProfileStore(db).get_by_id(profile_id) if profile_id else None
    if profile is None:
        raise NotFound(f"the profile of plan {plan_id} is gone")
    points = planning.frontier_points(profile, constraints, profile_id)
    chosen = FrontierPoint(bytes=total, error=err) if total is not None and err is not None \
        else None
    return FrontierPublic(plan_id=plan_id, points=[FrontierPoint(bytes=b, error=e)
                                                   for b, e in points], chosen=chosen)


@router.get("/plans/{plan_id}/frontier", response_model=FrontierPublic)
def get_frontier(plan_id: str, team: TeamDep, db: DbDep) -> FrontierPublic:
    return _frontier(db, team, plan_id)


@router.get("/plans/{plan_id}/plot.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def get_plot(plan_id: str, team: TeamDep, db: DbDep) -> Response:
    fr = _frontier(db, team, plan_id)
    from compressor.research.plots import (
        frontier_png,  # matplotlib loads on the first plot, not at start
    )

    curves = {"Pareto frontier": [(p.bytes / 2**20, p.error) for p in fr.points]}
    if fr.chosen is not None:
        curves["this plan"] = [(fr.chosen.bytes / 2**20, fr.chosen.error)]
    png = frontier_png(curves, "bytes (MiB)", "predicted error",
                       f"plan {plan_id[:8]}: predicted error vs bytes")
    return Response(png, media_type="image/png")


@router.post("/plans/{plan_id}/compress", status_code=202, response_model=CompressAccepted)
def compress_plan(plan_id: str, team: TeamDep, db: DbDep, queue: QueueDep,
                  settings: SettingsDep) -> CompressAccepted:
    with db.session() as s:
        team_plan(s, team, plan_id)
    art_id, job_id = request_compress(db, queue, team.id, plan_id, settings)
    return CompressAccepted(artifact_id=art_id, job_id=job_id,
                            links={"job": f"/v1/jobs/{job_id}",
                                   "artifact": f"/v1/artifacts/{art_id}"})


@router.delete("/plans/{plan_id}", status_code=204, response_class=Response)
def remove_plan(plan_id: str, team: TeamDep, db: DbDep, settings: SettingsDep) -> Response:
    """Delete a plan of your team, with its artifact; its unfinished jobs are cancelled."""
    delete_plan(db, settings, team.id, plan_id)
    return Response(status_code=204)
