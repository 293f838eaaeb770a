"""Models (shared by all teams): register, list, profile (+ plot), feasibility."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import DbDep, SettingsDep, TeamDep
from service.api.schemas import (
    Feasibility,
    ModelCreate,
    ModelPublic,
    ProfileLinear,
    ProfilePublic,
    Target,
)
from service.db.models import ErrorModel, ErrorSamples, LinearSensitivity, ModelRow, ProfileRow
from service.db.profile_store import DbProfileStore
from service.errors import Conflict, NotFound
from service.jobs import planning
from service.jobs.modelrefs import check_gguf_convertible
from service.jobs.submit import gguf_menu, latest_profile_id, resolve_and_register
from solver.gguf_types import GGUF_MENU

router = APIRouter(tags=["models"])
MAX_LIST = 500
TargetQuery = Annotated[Target, Query(description="the plan's target: one profile per target")]


def _model(s: Session, model_id: str) -> ModelRow:
    row = s.get(ModelRow, model_id)
    if row is None:
        raise NotFound(f"model {model_id} not found")
    return row


def model_public(s: Session, row: ModelRow) -> ModelPublic:
    pid = latest_profile_id(s, row.id)
    links = {"self": f"/v1/models/{row.id}", "feasibility": f"/v1/models/{row.id}/feasibility"}
    if pid:
        links |= {"profile": f"/v1/models/{row.id}/profile",
                  "profile_plot": f"/v1/models/{row.id}/profile/plot.png"}
    return ModelPublic(id=row.id, ref=row.ref, num_linears=row.num_linears,
                       linear_params=row.linear_params, kept_bytes=row.kept_bytes,
                       weights_hash=row.weights_hash, profile_id=pid, profiled=pid is not None,
                       profiled_at=s.get(ProfileRow, pid).completed_at if pid else None,
                       created_at=row.created_at, links=links)


@router.get("/models", response_model=list[ModelPublic])
def list_models(team: TeamDep, db: DbDep) -> list[ModelPublic]:
    with db.session() as s:
        rows = s.scalars(select(ModelRow).order_by(ModelRow.created_at).limit(MAX_LIST)).all()
        return [model_public(s, r) for r in rows]


@router.post("/models", response_model=ModelPublic, status_code=201)
def register_model(body: ModelCreate, team: TeamDep, db: DbDep,
                   settings: SettingsDep) -> ModelPublic:
    row = resolve_and_register(db, body.model, settings)
    with db.session() as s:
        return model_public(s, s.get(ModelRow, row.id))


@router.get("/models/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, team: TeamDep, db: DbDep) -> ModelPublic:
    with db.session() as s:
        return model_public(s, _model(s, model_id))


def _profile_row(s: Session, model_id: str, target: str = "native") -> ProfileRow:
    _model(s, model_id)
    pid = latest_profile_id(s, model_id, target)
    if pid is None:
        what = "profile" if target == "native" else f"{target} profile"
        raise Conflict(f"model {model_id} has no {what} yet; POST /v1/plans profiles it",
                       code="not_profiled")
    return s.get(ProfileRow, pid)


@router.get("/models/{model_id}/profile", response_model=ProfilePublic)
def get_profile(model_id: str, team: TeamDep, db: DbDep,
                target: TargetQuery = "native") -> ProfilePublic:
    with db.session() as s:
        row = _profile_row(s, model_id, target)
        n = dict(s.execute(select(ErrorSamples.linear, ErrorSamples.n_samples)
                           .where(ErrorSamples.profile_id == row.id)).all())
        r2 = dict(s.execute(select(ErrorModel.linear, ErrorModel.r2)
                            .where(ErrorModel.profile_id == row.id)).all())
        sens = {r.linear: r for r in s.scalars(select(LinearSensitivity)
                                               .where(LinearSensitivity.profile_id == row.id))}
        order = row.linear_order or sorted(sens)
        linears = [ProfileLinear(name=name, block=sens[name].block,
                                 out_features=sens[name].out_features,
                                 in_features=sens[name].in_features, alpha=sens[name].alpha,
                                 proxy=sens[name].proxy, n_samples=n.get(name, 0),
                                 fit_r2=r2.get(name)) for name in order if name in sens]
        return ProfilePublic(id=row.id, key=row.key, model_id=row.model_id,
                             complete=row.complete, fixed_bytes=row.fixed_bytes,
                             block_sensitivity=list(row.block_sensitivity),
                             block_proxy=list(row.block_proxy), stats=dict(row.stats),
                             linears=linears,
                             links={"plot": f"/v1/models/{model_id}/profile/plot.png"
                                    + ("" if target == "native" else f"?target={target}")})


@router.get("/models/{model_id}/profile/plot.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def get_profile_plot(model_id: str, team: TeamDep, db: DbDep,
                     target: TargetQuery = "native") -> Response:
    with db.session() as s:
        pid = _profile_row(s, model_id, target).id
    profile = DbProfileStore(db).get_by_id(pid)
    from compressor.research.plots import profile_plot_png  # matplotlib loads on the first plot

    return Response(profile_plot_png(profile), media_type="image/png")


@router.get("/models/{model_id}/feasibility", response_model=Feasibility)
def get_feasibility(model_id: str, team: TeamDep, db: DbDep, target: TargetQuery = "native",
                    settings: SettingsDep = None) -> Feasibility:
    """The bytes range a plan of `target` may ask for (the dashboard calls this directly)."""
    with db.session() as s:
        row = _model(s, model_id)
        pid = latest_profile_id(s, model_id, target)
        inventory, path = row.inventory, row.path
    if pid is not None:
        profile = DbProfileStore(db).get_by_id(pid)
        lo, hi = planning.feasibility(profile, None, pid)
        return Feasibility(model_id=model_id, min_bytes=lo, max_bytes=hi, source="profile",
                           target=target)
    if target == "gguf":
        check_gguf_convertible(Path(path))
    menu = gguf_menu(settings) if settings is not None else GGUF_MENU
    lo, hi = planning.inventory_feasibility(inventory, target, menu)
    return Feasibility(model_id=model_id, min_bytes=lo, max_bytes=hi, source="inventory",
                       target=target)
