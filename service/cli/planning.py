"""`bitplan profile MODEL` and `bitplan plan MODEL --budget …`: the embedded, file-backed path.

Profiles live under <data_dir>/profiles/<key>/ with an index from model reference to its latest
profile key, so `plan` solves from the stored profile without touching the model again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

import solver
from compressor import api
from compressor.checkpoint.headers import check_model_dir
from compressor.pipeline.profile_store import FileProfileStore
from service.cli.plan_summary import summarize_plan, summarize_profile
from service.errors import UserError
from service.settings import DEMO_MODEL, get_settings
from solver.bytes import TARGETS
from solver.ct_schemes import CT_TARGET
from solver.recipes import plan_to_yaml

# The commands below import torch-backed modules (compressor.pipeline.profile, .execute, .experiment, …)
# inside the function that needs them, so `bitplan --help`, `plan` and `serve` start without
# loading torch; plots import matplotlib on first use.


def register(sub) -> None:
    p = sub.add_parser("profile", help="profile a model once: sensitivity + fitted error models")
    p.add_argument("model")
    p.add_argument("--calib-seqs", type=int, default=None)
    _target_arg(p)
    p.add_argument("--gguf-types", default=None, metavar="T1,T2,…",
                   help="target gguf: the llama.cpp types the plan may use (default: all "
                        "bitplan encodes), e.g. Q4_0,IQ4_NL,Q6_K,Q8_0 to leave out types "
                        "that decode slowly on your CPU")
    p.add_argument("--plot", type=Path, default=None, help="write the per-block PNG here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="optimal per-linear plan for a budget, from the stored profile")
    p.add_argument("model")
    p.add_argument("--budget", required=True, help='bytes, "850MiB", "3.25bpp" or "0.22x"')
    p.add_argument("--method", default="exact", choices=["exact", "cpsat", "greedy"])
    _target_arg(p)
    p.add_argument("--constraints", type=Path, default=None, help="constraints JSON file")
    p.add_argument("--out", type=Path, default=None,
                   help="write the full plan JSON here (what `bitplan compress --plan` reads)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print the plan as JSON instead of the summary")
    fmt.add_argument("--yaml", action="store_true", help="print the recipe YAML instead")
    p.set_defaults(func=cmd_plan)
    register_execution(sub)


def _target_arg(p) -> None:
    p.add_argument("--target", default="native", choices=list(TARGETS),
                   help="what serves the plan: native (CALDERA W = Q + L·R, bitplan's runtime; "
                        "default), gguf (a llama.cpp type per tensor, written as a GGUF file) "
                        "or compressed-tensors (a vLLM scheme per module, written as a model "
                        "directory, L·R as a LoRA adapter)")


def profile_root() -> Path:
    return get_settings().data_dir / "profiles"


def _index_path() -> Path:
    return profile_root() / "index.json"


def _ref_key(model: str, target: str = "native") -> str:
    path = Path(model).expanduser()
    ref = str(path.resolve()) if path.exists() else model
    return ref if target == "native" else f"{ref}#{target}"   # one profile per target


def remember(model: str, key: str, target: str = "native") -> None:
    idx = json.loads(_index_path().read_text()) if _index_path().is_file() else {}
    idx[_ref_key(model, target)] = key
    _index_path().parent.mkdir(parents=True, exist_ok=True)
    _index_path().write_text(json.dumps(idx, indent=1))


def stored_profile(model: str, target: str = "native"):
    idx = json.loads(_index_path().read_text()) if _index_path().is_file() else {}
    key = idx.get(_ref_key(model, target))
    prof = FileProfileStore(profile_root()).get(key) if key else None
    if prof is None:
        what, flag = ("", "") if target == "native" else (f" {target}", f" --target {target}")
        raise UserError(f"no stored{what} profile for {model!r}; run "
                        f"`bitplan profile {model}{flag}` first")
    return prof


def check_model_ref(model: str) -> None:
    """Refuse a broken or unsupported local checkpoint (weights, architecture) before any other
    work or message: compressor.checkpoint.headers reads config.json and the safetensors headers only."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "bitplan_manifest.json").is_file():
        check_model_dir(path, model, get_settings().trust_remote_code)


def _gguf_types(text: str | None, target: str) -> tuple[str, ...]:
    """--gguf-types as type names, checked (empty: the default menu)."""
    if not text:
        return ()
    from solver.gguf_types import parse_types
    if target != "gguf":
        raise UserError("--gguf-types applies to --target gguf")
    try:
        return parse_types(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def ensure_profile(model: str, calib_seqs: int | None = None, quiet: bool = False,
                   target: str = "native", gguf_types: str | None = None):
    """The stored profile of `model` for `target`, profiling it first when there is none."""
    from compressor.pipeline.profile import ProfileConfig  # torch

    types = _gguf_types(gguf_types, target)
    check_model_ref(model)
    if target == "gguf":   # before any work: llama.cpp's converter must take the model
        from compressor.artifact.gguf_convert import (
            ConversionError,
            check_convertible,
            check_vocabulary,
        )
        try:
            check_convertible(Path(model))
            check_vocabulary(Path(model))
        except (ValueError, ConversionError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None
    if target == CT_TARGET:   # before any work: compressed-tensors quantizes nn.Linear only
        from compressor.checkpoint.headers import header_inventory
        from compressor.pipeline.targets import check_target_model
        path = Path(model).expanduser()
        if path.is_dir():
            try:
                check_target_model(header_inventory(path, model), target)
            except ValueError as exc:
                raise UserError(str(exc)) from None
    settings = get_settings()
    cfg = ProfileConfig(target=target)
    if types:
        cfg = dataclasses.replace(cfg, gguf_types=types)
    if calib_seqs:
        cfg = dataclasses.replace(cfg, calib_seqs=calib_seqs)
    bar = tqdm(total=100, desc="profile", unit="%", disable=quiet or not sys.stderr.isatty())

    def progress(stage: str, frac: float) -> None:
        bar.set_description(f"profile:{stage}")
        bar.update(round(100 * frac) - bar.n)

    prof = api.profile(model, cfg, store=profile_root(), device=settings.device,
                       trust_remote_code=settings.trust_remote_code, progress=progress)
    bar.close()
    remember(model, prof.key, target)
    return prof


def cmd_profile(args) -> int:
    prof = ensure_profile(args.model, args.calib_seqs, target=args.target,
                          gguf_types=args.gguf_types)
    if args.plot:
        from compressor.research.plots import profile_plot_png  # matplotlib

        args.plot.write_bytes(profile_plot_png(prof))
    from compressor.checkpoint.memory import peak_gpu_bytes, peak_rss_bytes

    # stats carry the stage times and peak memory of the run that measured the profile; the
    # peaks of this process are reported beside them (a stored profile costs only a lookup)
    summary = {"key": prof.key, "linears": len(prof.linears), "stats": prof.stats,
               "block_sensitivity": prof.block_sensitivity, "block_proxy": prof.block_proxy,
               "process": {"peak_rss_bytes": peak_rss_bytes(),
                           "peak_gpu_bytes": peak_gpu_bytes(get_settings().device)}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(summarize_profile(prof, summary["process"]["peak_rss_bytes"]))
    return 0


def solve_for(prof, budget: str, method: str = "exact", constraints: dict | None = None):
    problem = api.problem(prof, budget, constraints)
    return problem, api.plan(prof, budget, method=method, base=problem)


def cmd_plan(args) -> int:
    prof = stored_profile(args.model, args.target)
    constraints = json.loads(args.constraints.read_text()) if args.constraints else None
    problem, plan = solve_for(prof, args.budget, args.method, constraints)
    if args.out:
        args.out.write_text(json.dumps(plan.to_dict(), indent=1))
    if args.yaml:
        print(plan_to_yaml(plan))
    elif args.json:
        out = {"total_bytes": plan.total_bytes, "budget": plan.budget,
               "bits_per_param": round(plan.bits_per_param(problem.basis.params), 4),
               "predicted_kl": plan.predicted_error, "optimal": plan.optimal, "gap": plan.gap,
               "solve_ms": plan.solve_ms, "notes": plan.notes,
               "linears": {n: o.to_dict() for n, o in plan.assignments.items()}}
        print(json.dumps(out, indent=1))
    else:
        print(summarize_plan(plan, prof, problem))
        if args.out:
            print(f"\nplan JSON written to {args.out}")
    return 0


def register_execution(sub) -> None:
    p = sub.add_parser("compress", help="compress a model by a plan (or a budget) into an artifact")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--plan", type=Path, help="plan JSON (from `bitplan plan --out`)")
    g.add_argument("--budget", help="solve for this budget from the stored profile first")
    p.add_argument("--out", type=Path, required=True,
                   help="artifact directory (gguf: it gets model.gguf, the bf16 reference the "
                        "converter wrote and tensor-types.txt; compressed-tensors: the model "
                        "directory vLLM serves, with adapter/ for L·R)")
    _target_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("experiment", help="optimal vs the note's baselines at several budgets")
    p.add_argument("model")
    p.add_argument("--budgets", default=None, help="comma-separated, e.g. 2.4bpp,3bpp,4.5bpp")
    p.add_argument("--out", type=Path, default=None, help="report directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("demo", help="profile → plan → compress → evaluate the demo model")
    p.add_argument("--budget", default="2.75bpp")
    p.add_argument("--out", type=Path, default=None, help="artifact/report directory")
    p.set_defaults(func=cmd_demo)


def compress_to_artifact(model_ref: str, prof, plan, out: Path, quiet: bool = False) -> dict:
    """Compress every linear as planned, save the artifact, evaluate it against the original."""
    from compressor.pipeline.execute import ExecuteConfig  # torch

    settings = get_settings()
    config = ExecuteConfig(device=settings.device, trust_remote_code=settings.trust_remote_code,
                           eval_seq_len=settings.eval_seq_len, eval_seqs=settings.eval_seqs)
    bar = tqdm(total=100, desc="compress", unit="%", disable=quiet or not sys.stderr.isatty())

    def progress(stage: str, frac: float) -> None:
        bar.set_description(f"compress:{stage}")
        bar.update(round(100 * frac) - bar.n)

    done = api.compress(model_ref, prof, plan, out, config=config, progress=progress)
    bar.close()
    m = done.metrics
    out = {"artifact": str(done.artifact), "planned_bytes": plan.total_bytes,
           "artifact_bytes": done.tensor_bytes, "ppl": m["ppl"], "kl": m["kl"],
           "top1": m["top1"], "predicted_kl": m["predicted_kl"]}
    if prof.config.get("target") == CT_TARGET:
        from compressor.artifact.ct_export import serve_command
        out["serve"] = serve_command(done.artifact)
    return out


def cmd_compress(args) -> int:
    check_model_ref(args.model)
    prof = stored_profile(args.model, args.target)
    if args.plan:
        plan = solver.Plan.from_dict(json.loads(args.plan.read_text()))
    else:
        _, plan = solve_for(prof, args.budget)
    print(json.dumps(compress_to_artifact(args.model, prof, plan, args.out), indent=1))
    return 0


def cmd_experiment(args) -> int:
    from compressor.research.experiment import DEFAULT_BUDGETS, run_experiment  # torch

    prof = ensure_profile(args.model)
    budgets = args.budgets.split(",") if args.budgets else DEFAULT_BUDGETS
    out = args.out or get_settings().data_dir / "reports" / prof.key
    bar = tqdm(total=100, desc="experiment", unit="%", disable=not sys.stderr.isatty())

    def progress(stage: str, frac: float) -> None:
        bar.update(round(100 * frac) - bar.n)

    settings = get_settings()
    result = run_experiment(args.model, prof, budgets, out_dir=out, progress=progress,
                            device=settings.device, cache_dir=settings.data_dir / "cache" / prof.key)
    bar.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"report: {out / 'REPORT.md'}")
    return 0


def cmd_demo(args) -> int:
    # torch: the demo measures uniform beside the optimal plan
    from compressor.checkpoint.data import Split, token_sequences
    from compressor.checkpoint.loading import load_model, load_tokenizer
    from compressor.pipeline.compress import calibration_hessians
    from compressor.pipeline.profile import ProfileConfig, calibration
    from compressor.research.experiment import baseline_plan
    from compressor.research.plan_eval import PlanEvaluator

    if not args.verbose:  # the demo prints its own steps; per-linear logs only with -v
        logging.getLogger("compressor").setLevel(logging.WARNING)
    settings = get_settings()
    model_ref = str(DEMO_MODEL)
    out = args.out or settings.data_dir / "demo"
    print(f"[1/4] profile {model_ref} (reused when stored)", flush=True)
    prof = ensure_profile(model_ref)
    from compressor.research.plots import profile_plot_png  # matplotlib

    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.png").write_bytes(profile_plot_png(prof))
    print(f"[2/4] plan for {args.budget}", flush=True)
    problem, plan = solve_for(prof, args.budget)
    uniform = baseline_plan("uniform", problem, prof)
    print("[3/4] compress the optimal plan into an artifact and evaluate it", flush=True)
    opt = compress_to_artifact(model_ref, prof, plan, out / "artifact")
    print("[4/4] measure uniform at the same budget", flush=True)
    cfg = ProfileConfig.from_dict(prof.config)
    model, tok = load_model(model_ref), load_tokenizer(model_ref)
    names = list(plan.assignments)
    ev = PlanEvaluator(model, calibration_hessians(model, calibration(tok, cfg), names),
                       token_sequences(tok, Split.TEST, settings.eval_seq_len,
                                       n_seqs=settings.eval_seqs), config=cfg.decomposition,
                       cache_dir=settings.data_dir / "cache" / prof.key)
    orig = ev.baseline()
    uni = ev.measure(uniform.assignments)
    rows = [("original (fp32)", prof.fixed_bytes + 4 * problem.total_linear_params, orig.ppl,
             0.0, 1.0),
            ("uniform", uniform.total_bytes, uni.ppl, uni.kl, uni.top1),
            ("bitplan optimal", opt["artifact_bytes"], opt["ppl"], opt["kl"], opt["top1"])]
    print(f"\nbudget {args.budget} = {problem.budget:,} bytes\n")
    print(f"{'plan':<18}{'bytes':>12}{'ppl':>10}{'KL':>10}{'top-1':>8}")
    for name, nbytes, ppl, kl, top1 in rows:
        print(f"{name:<18}{nbytes:>12,}{ppl:>10.3f}{kl:>10.4f}{top1:>8.3f}")
    excess = (uni.ppl - opt["ppl"]) / max(uni.ppl - orig.ppl, 1e-9)
    print(f"\noptimal removes {100 * excess:.1f}% of uniform's excess perplexity; KL "
          f"{100 * (uni.kl - opt['kl']) / uni.kl:.1f}% lower; predicted KL {opt['predicted_kl']:.4f}")
    print(f"artifact: {opt['artifact']}  (bytes {opt['artifact_bytes']:,} = planned "
          f"{opt['planned_bytes']:,})\nprofile plot: {out / 'profile.png'}")
    print("full experiment: .venv/bin/bitplan experiment models/bitplan-demo")
    return 0
