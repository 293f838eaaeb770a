"""`bitplan profile MODEL` and `bitplan plan MODEL --budget …`: the embedded, file-backed path.

Profiles live under <data_dir>/profiles/<key>/ with an index from model reference to its latest
profile key, so `plan` solves from the stored profile without touching the model again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.settings import get_settings


def register(sub) -> None:
    p = sub.add_parser("profile", help="profile a model once: sensitivity + fitted error models")
    p.add_argument("model")
    p.add_argument("--calib-seqs", type=int, default=None)
    p.add_argument("--plot", type=Path, default=None, help="write the per-block PNG here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="optimal per-linear plan for a budget, from the stored profile")
    p.add_argument("model")
    p.add_argument("--budget", required=True, help='bytes, "850MiB", "3.25bpp" or "0.22x"')
    p.add_argument("--method", default="exact", choices=["exact", "cpsat", "greedy"])
    p.add_argument("--constraints", type=Path, default=None, help="constraints JSON file")
    p.add_argument("--out", type=Path, default=None, help="write the plan JSON here")
    p.add_argument("--yaml", action="store_true", help="print the recipe YAML instead")
    p.set_defaults(func=cmd_plan)


def profile_root() -> Path:
    return get_settings().data_dir / "profiles"


def _index_path() -> Path:
    return profile_root() / "index.json"


def _ref_key(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def remember(model: str, key: str) -> None:
    idx = json.loads(_index_path().read_text()) if _index_path().is_file() else {}
    idx[_ref_key(model)] = key
    _index_path().parent.mkdir(parents=True, exist_ok=True)
    _index_path().write_text(json.dumps(idx, indent=1))


def stored_profile(model: str):
    from compressor.profile_store import FileProfileStore
    from service.cli import UserError

    idx = json.loads(_index_path().read_text()) if _index_path().is_file() else {}
    key = idx.get(_ref_key(model))
    prof = FileProfileStore(profile_root()).get(key) if key else None
    if prof is None:
        raise UserError(f"no stored profile for {model!r}; run `bitplan profile {model}` first")
    return prof


def ensure_profile(model: str, calib_seqs: int | None = None, quiet: bool = False):
    """The stored profile of `model`, profiling it first when there is none."""
    import dataclasses

    from tqdm import tqdm

    from compressor.profile import ProfileConfig, run_profile
    from compressor.profile_store import FileProfileStore

    settings = get_settings()
    cfg = ProfileConfig()
    if calib_seqs:
        cfg = dataclasses.replace(cfg, calib_seqs=calib_seqs)
    bar = tqdm(total=100, desc="profile", unit="%", disable=quiet or not sys.stderr.isatty())

    def progress(stage: str, frac: float) -> None:
        bar.set_description(f"profile:{stage}")
        bar.update(round(100 * frac) - bar.n)

    prof = run_profile(model, FileProfileStore(profile_root()), device=settings.device,
                       trust_remote_code=settings.trust_remote_code, progress=progress, config=cfg)
    bar.close()
    remember(model, prof.key)
    return prof


def cmd_profile(args) -> int:
    prof = ensure_profile(args.model, args.calib_seqs)
    if args.plot:
        from compressor.profile import profile_plot_png

        args.plot.write_bytes(profile_plot_png(prof))
    summary = {"key": prof.key, "linears": len(prof.linears), "stats": prof.stats,
               "block_sensitivity": prof.block_sensitivity, "block_proxy": prof.block_proxy}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def solve_for(prof, budget: str, method: str = "exact", constraints: dict | None = None):
    import solver
    from compressor.planning import build_problem

    problem = build_problem(prof, budget, constraints)
    problem.check_budget()
    return problem, solver.solve(problem, method=solver.Method(method))


def cmd_plan(args) -> int:
    from solver.recipes import plan_to_yaml

    prof = stored_profile(args.model)
    constraints = json.loads(args.constraints.read_text()) if args.constraints else None
    problem, plan = solve_for(prof, args.budget, args.method, constraints)
    if args.out:
        args.out.write_text(json.dumps(plan.to_dict(), indent=1))
    if args.yaml:
        print(plan_to_yaml(plan))
        return 0
    out = {"total_bytes": plan.total_bytes, "budget": plan.budget,
           "bits_per_param": round(plan.bits_per_param(problem.total_linear_params), 4),
           "predicted_kl": plan.predicted_error, "optimal": plan.optimal, "gap": plan.gap,
           "solve_ms": plan.solve_ms,
           "linears": {n: o.to_dict() for n, o in plan.assignments.items()}}
    print(json.dumps(out, indent=1))
    return 0
