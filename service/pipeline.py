"""Glue between the job runner and the math: each stage loads what it needs by id, calls
compressor/solver, and stores the outcome. The heavy modules are imported inside the functions,
so the API starts fast and `service` imports before they exist."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from service.db.models import Artifact, Job, JobKind, ModelRow, PlanRow, ProfileRow, utcnow
from service.db.profile_store import DbProfileStore
from service.jobs.state import JobFailed

if TYPE_CHECKING:
    from compressor.profile_store import Profile
    from service.jobs.runner import StageContext, StageResult

log = logging.getLogger(__name__)


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require(module: str, what: str):
    if not available(module):
        raise JobFailed(f"{what} is not available in this build ({module} is missing)",
                        "unavailable")
    return importlib.import_module(module)


def _result(**kw: Any) -> StageResult:
    from service.jobs.runner import StageResult

    return StageResult(**kw)


# -- problem building (shared by the API's synchronous reads and the solve stage) --------------
_PROBLEMS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_PROBLEMS_LOCK = threading.Lock()
_PROBLEMS_SIZE = 32


def build_problem(profile: Profile, budget: Any, constraints: dict | None):
    planning = _require("compressor.planning", "planning")   # torch-free: the API solves too
    return planning.build_problem(profile, budget, constraints or None)


def base_problem(profile: Profile, constraints: dict | None, profile_id: str | None = None):
    """The budget-less problem of a profile + constraints. Complete profiles never change, so
    it is cached by (profile, constraints): menus and their Pareto/LP data are built once and a
    cached-profile plan request only parses its budget and solves."""
    ck = (profile_id or profile.key, json.dumps(constraints or {}, sort_keys=True, default=str))
    with _PROBLEMS_LOCK:
        hit = _PROBLEMS.get(ck)
        if hit is not None:
            _PROBLEMS.move_to_end(ck)
            return hit
    problem = build_problem(profile, None, constraints)
    with _PROBLEMS_LOCK:
        _PROBLEMS[ck] = problem
        while len(_PROBLEMS) > _PROBLEMS_SIZE:
            _PROBLEMS.popitem(last=False)
    return problem


def problem_at(profile: Profile, budget: Any, constraints: dict | None,
               profile_id: str | None = None):
    """The problem at a budget; InfeasibleBudget (a ValueError, naming the minimum) when the
    budget is below the minimum feasible bytes."""
    base = base_problem(profile, constraints, profile_id)
    fp16 = profile.stats.get("fp16_bytes") if isinstance(profile.stats, dict) else None
    problem = base.with_budget(base.parse_budget(budget, fp16_bytes=fp16))
    problem.check_budget()
    return problem


def feasibility(profile: Profile, constraints: dict | None = None,
                profile_id: str | None = None) -> tuple[int, int]:
    lo, hi = base_problem(profile, constraints, profile_id).feasibility()
    return int(lo), int(hi)


def model_budget_bytes(inventory: dict, budget: Any) -> int:
    """Parse a budget against the model's layer inventory (before any profile exists): bad
    strings, units, signs and sizes fail here with the solver's message."""
    from solver.budget import parse_budget

    linear_params = sum(int(li["out_features"]) * int(li["in_features"])
                        for li in inventory.get("linears", []))
    kept = inventory.get("kept", [])
    fp16 = 2 * (linear_params + sum(math.prod(k["shape"]) for k in kept))
    return parse_budget(budget, total_linear_params=linear_params, fp16_bytes=fp16,
                        fixed_bytes=sum(int(k["nbytes"]) for k in kept))


def check_budget(profile: Profile, budget: str, constraints: dict | None,
                 profile_id: str | None = None) -> None:
    """Raise ValueError (InfeasibleBudget/BudgetError) when the budget cannot be met."""
    problem_at(profile, budget, constraints, profile_id)


def solve_plan(profile: Profile, budget: str, constraints: dict | None, method: str,
               profile_id: str | None = None):
    import solver

    problem = problem_at(profile, budget, constraints, profile_id)
    return problem, solver.solve(problem, method=solver.Method(method))


def frontier_points(profile: Profile, constraints: dict | None,
                    profile_id: str | None = None) -> list[tuple[int, float]]:
    """The Pareto frontier (bytes, predicted error) of the plan's problem (budget-free)."""
    import solver

    pts = solver.frontier(base_problem(profile, constraints, profile_id))
    out: list[tuple[int, float]] = []
    for p in getattr(pts, "points", pts):
        if isinstance(p, dict):
            b, e = p.get("bytes", p.get("total_bytes")), p.get("error", p.get("predicted_error"))
        elif isinstance(p, tuple | list):
            b, e = p[0], p[1]
        else:
            b = getattr(p, "bytes", getattr(p, "total_bytes", None))
            e = getattr(p, "error", getattr(p, "predicted_error", None))
        out.append((int(b), float(e)))
    return out


def inventory_feasibility(inventory: dict) -> tuple[int, int]:
    """Bytes range from the layer inventory alone (before a profile exists): every linear at
    2 bits without correction, and every linear at fp16; kept parameters at their dtype."""
    from solver.bytes import Option, fp16_bytes, option_bytes

    kept = sum(int(k["nbytes"]) for k in inventory.get("kept", []))
    shapes = [(int(li["out_features"]), int(li["in_features"]))
              for li in inventory.get("linears", [])]
    low = Option(bits=2, rank=0)
    return (kept + sum(option_bytes(m, n, low) for m, n in shapes),
            kept + sum(fp16_bytes(m, n) for m, n in shapes))


def plan_summary(plan_dict: dict) -> dict:
    """The headline numbers of a solver.Plan.to_dict(), whatever its exact field names."""
    def pick(*names: str) -> Any:
        for n in names:
            v = plan_dict.get(n)
            if v is not None:
                return v
        return None

    return {"total_bytes": pick("total_bytes", "bytes"),
            "budget_bytes": pick("budget_bytes", "budget"),
            "predicted_error": pick("predicted_error", "error", "objective", "predicted"),
            "optimality_gap": pick("optimality_gap", "gap")}


def linear_table(plan_dict: dict) -> list[dict]:
    """One row per linear: its option (bits, rank, factor bits, group size), bytes, error."""
    rows = plan_dict.get("assignments") or {}
    lb, le = plan_dict.get("linear_bytes") or {}, plan_dict.get("linear_errors") or {}
    if isinstance(rows, dict):
        return [{"name": k} | (v if isinstance(v, dict) else {"option": v})
                | {"bytes": lb.get(k), "predicted_error": le.get(k)} for k, v in rows.items()]
    return list(rows)


# -- stages ------------------------------------------------------------------------------------
def _load(ctx: StageContext) -> tuple[Job, ModelRow | None, PlanRow | None]:
    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        model = s.get(ModelRow, job.model_id) if job.model_id else None
        plan = s.get(PlanRow, job.plan_id) if job.plan_id else None
        return job, model, plan


def profile_config(settings):
    """The operator's ProfileConfig (part of the profile key: change it, get a new profile)."""
    from compressor.decompose import DecompositionConfig
    from compressor.profile import ProfileConfig

    def norm(v):  # noqa: ANN001, ANN202 - JSON lists back to the config's tuples
        return tuple(norm(x) for x in v) if isinstance(v, list) else v

    over = {k: norm(v) for k, v in (settings.profile_config or {}).items()}
    if isinstance(over.get("decomposition"), dict):
        over["decomposition"] = DecompositionConfig.from_dict(over["decomposition"])
    unknown = set(over) - set(ProfileConfig.__dataclass_fields__)
    if unknown:
        raise JobFailed(f"unknown profile_config keys: {sorted(unknown)}", "bad_settings")
    return ProfileConfig(**over)


def profile_stage(ctx: StageContext) -> StageResult:
    """GPU queue: profile the model (resumable per linear through the DB store), then check and
    summarise the fitted error models (stage `fit`)."""
    job, model, _ = _load(ctx)
    if model is None:
        raise JobFailed("profile job has no model", "invalid_job")
    prof = _require("compressor.profile", "profiling")
    store = DbProfileStore(ctx.db)

    def progress(stage: str, frac: float) -> None:   # load/hessians/linears → profile/…
        if stage != "done":
            ctx.report(f"profile/{stage}", 0.95 * frac)

    ctx.report("profile", 0.0)
    seed_shipped_profile(store, model.path)
    profile = prof.run_profile(model.path, store, device=ctx.settings.device,
                               trust_remote_code=ctx.settings.trust_remote_code,
                               progress=progress, config=profile_config(ctx.settings))
    ctx.report("fit", 0.96)
    if store.get(profile.key) is None:
        store.put(profile)
    profile_id = store.link_model(profile.key, model.id)
    with ctx.db.session() as s:
        row = s.get(ModelRow, model.id)
        if row is not None and profile.weights_hash:
            row.weights_hash = profile.weights_hash
    return _result(result={"profile_id": profile_id, "profile_key": profile.key}
                   | fit_summary(profile), links={"profile_id": profile_id})


def seed_shipped_profile(store: DbProfileStore, model_path: str) -> None:
    """A profile shipped beside the model (`bitplan_profile.json`, e.g. the demo's) is put in
    the store; run_profile uses it only if its key matches what it computes from these weights,
    this calibration set, config and code version."""
    from pathlib import Path

    from compressor.profile_store import Profile

    shipped = Path(model_path) / "bitplan_profile.json"
    if not shipped.is_file():
        return
    try:
        prof = Profile.from_dict(json.loads(shipped.read_text()))
        if store.get(prof.key) is None:
            store.put(prof)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring the profile shipped at %s: %s", shipped, exc)


def fit_summary(profile: Profile) -> dict:
    """Every linear must carry a fitted E_i(b, r); report how well they fit."""
    missing = [lp.name for lp in profile.linears if not lp.fit]
    if missing:
        raise JobFailed(f"{len(missing)} linears lack a fitted error model "
                        f"(first: {missing[0]})", "fit_missing")
    r2 = [v for lp in profile.linears for k, v in lp.fit.items()
          if k in ("r2_heldout", "r2_fit", "r2") and isinstance(v, int | float)]
    return {"linears": len(profile.linears), "fitted": len(profile.linears),
            "fit_r2_mean": round(sum(r2) / len(r2), 4) if r2 else None}


def fit_stage(ctx: StageContext) -> StageResult:
    """CPU queue: check the fitted error models of the job's stored profile."""
    job, _, _ = _load(ctx)
    if not job.profile_id:
        raise JobFailed("fit job has no profile", "invalid_job")
    profile = DbProfileStore(ctx.db).get_by_id(job.profile_id)
    if profile is None:
        raise JobFailed(f"profile {job.profile_id} is not complete", "invalid_job")
    return _result(result=fit_summary(profile))


def _profile_for(ctx: StageContext, job: Job, plan: PlanRow) -> str | None:
    if plan.profile_id:
        return plan.profile_id
    with ctx.db.session() as s:
        if job.depends_on:
            dep = s.get(Job, job.depends_on)
            if dep is not None and dep.profile_id:
                return dep.profile_id
        return s.scalar(select(ProfileRow.id).where(ProfileRow.model_id == plan.model_id,
                                                    ProfileRow.complete.is_(True))
                        .order_by(ProfileRow.completed_at.desc()).limit(1))


def solve_stage(ctx: StageContext) -> StageResult:
    """CPU queue: solve the plan's allocation problem from its stored profile."""
    job, _, plan = _load(ctx)
    if plan is None:
        raise JobFailed("solve job has no plan", "invalid_job")
    profile_id = _profile_for(ctx, job, plan)
    profile = DbProfileStore(ctx.db).get_by_id(profile_id) if profile_id else None
    if profile is None:
        raise JobFailed("no complete profile for this model", "profile_missing")
    ctx.report("solve", 0.05)
    problem, result = solve_plan(profile, plan.budget, plan.constraints, plan.method,
                                 profile_id)
    plan_dict = result.to_dict()
    summary = plan_summary(plan_dict)
    follow: list[tuple[str, str]] = []
    with ctx.db.session() as s:
        row = s.get(PlanRow, plan.id)
        row.profile_id = profile_id
        row.result = plan_dict
        row.status = "solved"
        row.solved_at = utcnow()
        for k in ("total_bytes", "budget_bytes", "predicted_error", "optimality_gap"):
            if isinstance(summary[k], int | float):
                setattr(row, k, summary[k])
        if problem.budget is not None:
            row.budget_bytes = int(problem.budget)
        if row.compress and available("compressor.compress"):
            follow.append(("bitplan.compress", create_compress_job(s, row).id))
    return _result(result=summary | {"plan_id": plan.id}, links={"profile_id": profile_id},
                   follow_ups=follow)


def create_compress_job(s, plan: PlanRow) -> Job:
    """One artifact (and one compress job) per plan: asking twice returns the same ones."""
    from service.db.models import new_id
    from service.db.upsert import upsert

    upsert(s, Artifact.__table__, [{"id": new_id(), "team_id": plan.team_id, "plan_id": plan.id,
                                    "status": "pending", "metrics": {},
                                    "created_at": utcnow()}],
           keys=["plan_id"], update_cols=[])
    art = s.scalar(select(Artifact).where(Artifact.plan_id == plan.id))
    dedup = f"compress:{plan.id}"
    upsert(s, Job.__table__, [{"id": new_id(), "team_id": plan.team_id, "kind": JobKind.COMPRESS,
                               "status": "queued", "stage": "queued", "progress": 0.0,
                               "attempts": 0, "dedup_key": dedup, "plan_id": plan.id,
                               "model_id": plan.model_id, "profile_id": plan.profile_id,
                               "artifact_id": art.id, "payload": {}, "result": {},
                               "history": [], "created_at": utcnow(),
                               "updated_at": utcnow()}], keys=["dedup_key"], update_cols=[])
    job = s.scalar(select(Job).where(Job.dedup_key == dedup))
    art.job_id = job.id
    return job


def compress_stage(ctx: StageContext) -> StageResult:
    """GPU queue: execute the plan, save the artifact, measure it (layer-resumable)."""
    _require("compressor.compress", "compression")
    from service import compress_job

    return compress_job.run(ctx)


def evaluate_stage(ctx: StageContext) -> StageResult:
    _require("compressor.evaluate", "evaluation")
    raise JobFailed("evaluation jobs are not wired into the service yet", "unavailable")


# -- plots ------------------------------------------------------------------------------------
def profile_plot_png(profile: Profile) -> bytes:
    prof = _require("compressor.profile", "profile plots")
    if hasattr(prof, "profile_plot_png"):
        return prof.profile_plot_png(profile)
    plots = _require("compressor.plots", "profile plots")
    return plots.profile_png(profile.block_sensitivity, profile.block_proxy,
                             f"per-block sensitivity: {profile.model_ref}")


def frontier_plot_png(points: list[tuple[float, float]], chosen: tuple[float, float] | None,
                      title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        xs, ys = zip(*sorted(points), strict=True)
        ax.step([x / 2**20 for x in xs], ys, where="post", label="Pareto frontier")
    if chosen is not None:
        ax.plot([chosen[0] / 2**20], [chosen[1]], "o", color="C3", label="this plan")
    ax.set_xlabel("bytes (MiB)")
    ax.set_ylabel("predicted error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
