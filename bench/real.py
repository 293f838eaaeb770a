"""`bitplan bench real --json`: a real pretrained model (SmolLM2-135M, imported from its GGUF by
`make smollm2` into models/smollm2-135m) end to end, every figure measured in this run:

- `profile_s`: a fresh profile (run_profile into an empty temporary store, so nothing stored is
  reused) with the default ProfileConfig;
- `compress_s`: one streamed compression pass (execute_plan) of the optimal plan at
  COMPRESS_BUDGET: its "compress" stage (the calibration activations through every block, the
  Hessians, every planned item — the embedding too — decomposed and written to the artifact) plus
  its "save" stage (the kept tensors copied, the manifest written); not the model's opening nor
  the artifact's evaluation. `profile_over_compress` = profile_s / compress_s;
- per budget, in bits per parameter over *every* parameter (solver.budget: "3.5bpp" =
  floor(3.5 · params / 8) bytes, the embedding, head, norms and biases counted): the optimal plan,
  the note's uniform plan and the best single format (run_experiment's "uniform_best"), each
  compressed and measured on the test split (KL to the original, perplexity, top-1); the note's
  other strategies and section 2 are left out (each decomposes every linear again: on this
  model they would triple the run);
- `checks`: what the figures claim, verified here (the optimum within its budget, its bytes the
  kept tensors' plus every planned item's, the embedding planned, the artifact's bytes the plan's);
- `peak_rss_bytes`: the process's peak resident memory over the whole run (VmHWM across the
  stages' windows), and the peak as it stood after each stage (`peak_rss_bytes_through`).

`--quick`: a tiny Llama GGUF (bench/tiny_gguf.py) written to a temporary directory and imported
as `make smollm2` imports SmolLM2's, then the same figures on 2 budgets and 4 test sequences.
BITPLAN_BENCH_REAL_MODEL: another model directory, or a .gguf file (imported first).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import solver
from bench.progress import StageProgress
from bench.tiny_gguf import write_tiny_llama_gguf
from compressor import api
from compressor.checkpoint.gguf_import import import_gguf
from compressor.checkpoint.headers import ModelLoadError, config_dtype
from compressor.checkpoint.loading import inventory
from compressor.checkpoint.memory import peak_rss_bytes
from compressor.pipeline.execute import ExecuteConfig
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore, Profile
from compressor.research.experiment import run_experiment
from service.settings import REPO_ROOT, get_settings
from solver.bytes import option_bytes

SMOLLM2 = REPO_ROOT / "models" / "smollm2-135m"
ENV = "BITPLAN_BENCH_REAL_MODEL"
BUDGETS = ("2.5bpp", "3.0bpp", "3.5bpp", "4.0bpp", "4.5bpp")
COMPRESS_BUDGET = "3.5bpp"          # the plan the timed compression pass executes
EVAL_SEQS = 16                      # test sequences × 256 tokens per measured plan
QUICK = {"budgets": ("3.5bpp", "4.5bpp"), "compress": "3.5bpp", "eval_seqs": 4}
STRATEGIES = {"optimal": "optimal", "uniform": "uniform", "best_format": "uniform_best"}
FIGURES = ("kl", "ppl", "top1", "bytes", "predicted", "bits_per_param")
TIMED = ("execute_plan stages 'compress' (calibration activations through every block, "
         "Hessians, every planned item decomposed and written to the artifact) + 'save' (kept "
         "tensors, manifest); not 'load' (opening the model) nor 'evaluate'")


def _say(line: str) -> None:
    print(f"bench real: {line}", file=sys.stderr, flush=True)


def _import(gguf: Path, tmp: Path) -> Path:
    _say(f"importing {gguf}")
    return import_gguf(gguf, tmp / "model", progress=_say).out


def _model(quick: bool, tmp: Path) -> tuple[Path | None, str]:
    """(model directory, where it came from), or (None, the reason there is none)."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        if path.is_file() and path.suffix == ".gguf":
            return _import(path, tmp), f"{path} (GGUF, imported in this run)"
        if (path / "config.json").is_file():
            return path, str(path)
        return None, (f"{ENV}={given}: neither a model directory (config.json) nor a .gguf "
                      f"file; `make smollm2` imports SmolLM2-135M to {SMOLLM2}")
    if quick:
        gguf = write_tiny_llama_gguf(tmp / "tiny.gguf")
        return _import(gguf, tmp), "bench/tiny_gguf.py's tiny Llama GGUF, imported in this run"
    if (SMOLLM2 / "config.json").is_file():
        return SMOLLM2, str(SMOLLM2)
    return None, (f"no model at {SMOLLM2}: run `make smollm2` first (it imports SmolLM2-135M "
                  f"from its GGUF, ~1 min), or set {ENV} to a model directory or .gguf file")


def run(args) -> dict:  # argparse namespace
    quick = bool(getattr(args, "quick", False))
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-real-") as name:
        tmp = Path(name)
        try:
            ref, source = _model(quick, tmp)
            if ref is None:
                _say(source)
                return {"error": source}
            return _measure(str(ref), source, quick, tmp)
        except ModelLoadError as exc:
            _say(str(exc))
            return {"error": str(exc)}


def _model_figures(ref: str, source: str, inv, prof: Profile) -> dict:
    cfg = inv.config
    return {"name": Path(ref).name, "path": ref, "source": source,
            "label": cfg.get("_model_name_or_path"),
            "params": _params(inv),
            "planned_params": inv.linear_params, "planned_items": len(inv.linears),
            "blocks": inv.num_blocks, "vocab": cfg.get("vocab_size"),
            "hidden": cfg.get("hidden_size"), "dtype": config_dtype(cfg),
            "tied": bool(cfg.get("tie_word_embeddings")), "kept_bytes": inv.kept_bytes,
            "fp16_bytes": prof.stats.get("fp16_bytes")}


def _params(inv) -> int:
    """Every parameter of the model: the planned items' and the kept tensors' (a tied one once)."""
    return inv.linear_params + sum(math.prod(k.shape) for k in inv.kept)


def _opt(o: solver.Option) -> list[int]:
    return [o.bits, o.rank, o.factor_bits, o.group_size]


def _measure(ref: str, source: str, quick: bool, tmp: Path) -> dict:
    device = get_settings().device
    budgets = QUICK["budgets"] if quick else BUDGETS
    at = QUICK["compress"] if quick else COMPRESS_BUDGET
    eval_seqs = QUICK["eval_seqs"] if quick else EVAL_SEQS
    inv = inventory(ref)
    t_run = time.perf_counter()

    _say(f"[1/3] profile {ref} from scratch ({len(inv.linears)} items, {inv.num_blocks} blocks)")
    cfg = ProfileConfig()
    t0 = time.perf_counter()
    prof = run_profile(ref, FileProfileStore(tmp / "profiles"), device=device, config=cfg,
                       progress=StageProgress(_say, "profile"))
    profile_s = time.perf_counter() - t0
    through = {"profile": peak_rss_bytes()}

    base = api.problem(prof)
    plans = {b: api.plan(prof, b, base=base) for b in budgets}
    _say(f"[2/3] compress: the optimal plan at {at}, streamed, into a temporary artifact")
    ex = api.compress(ref, prof, plans[at], tmp / "artifact", progress=StageProgress(_say, "compress"),
                      config=ExecuteConfig(device=device, eval_seqs=eval_seqs))
    stage_s = ex.metrics["stage_s"]
    compress_s = stage_s["compress"] + stage_s.get("save", 0.0)
    through["compress"] = peak_rss_bytes()

    _say(f"[3/3] experiment: {len(budgets)} budgets × (optimal + baselines), "
         f"{eval_seqs} test sequences each")
    result = run_experiment(ref, prof, budgets=budgets, eval_seqs=eval_seqs, refine_rounds=0,
                            progress=StageProgress(_say, "experiment"), device=device,
                            with_section2=False, strategies=("uniform",))
    through["experiment"] = peak_rss_bytes()

    rows = _budget_rows(result, plans)
    checks = _checks(inv, prof, plans, result, ex)
    opt_at = next(r["optimal"] for r in rows if r["budget"] == at)
    gains_u = [r["kl_vs_uniform_pct"] for r in rows if r["kl_vs_uniform_pct"] is not None]
    gains_b = [r["kl_vs_best_format_pct"] for r in rows if r["kl_vs_best_format_pct"] is not None]
    ratio = profile_s / compress_s
    out = {
        "model": _model_figures(ref, source, inv, prof),
        "profile_s": profile_s, "compress_s": compress_s, "profile_over_compress": ratio,
        "compress_timed": TIMED, "compress_plan": f"optimal at {at}",
        "compress_stage_s": stage_s,
        "compress_pass": {"planned_bytes": ex.metrics["planned_bytes"],
                          "artifact_tensor_bytes": ex.metrics["artifact_tensor_bytes"],
                          # the artifact read back, packed, streamed, on the experiment's test
                          # sequences: beside the experiment's measure of the same plan
                          "kl": ex.metrics["kl"], "ppl": ex.metrics["ppl"],
                          "top1": ex.metrics["top1"], "experiment_kl": opt_at["kl"]},
        "profile_config": prof.config, "profile_stats": {
            k: prof.stats.get(k) for k in ("wall_s", "sampling_s", "probe_s", "fit_r2_mean",
                                           "spearman_alpha_vs_proxy", "stage_s")},
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_bytes_through": through,
        "device": device, "eval_seqs": eval_seqs, "eval_seq_len": 256,
        "original_ppl": result["original_ppl"],
        "budget_basis": "bits per parameter over every parameter (embedding, head, norms, "
                        "biases): budget_bytes = floor(bpp · params / 8)",
        "budgets": rows,
        "embedding_in_plan": checks["embedding_in_plan"],
        "checks": checks, "checks_ok": all(checks.values()),
        "goal": {"min_kl_vs_uniform_pct": min(gains_u, default=None),
                 "min_kl_vs_best_format_pct": min(gains_b, default=None),
                 "optimal_never_worse_than_uniform_kl":
                     result["optimal_never_worse_than_uniform_kl"],
                 "profile_over_compress_le_3": ratio <= 3},
        "experiment_s": result["seconds"], "decompositions": result["decompositions"],
        "experiment_passes": result.get("passes"),
        "wall_s": time.perf_counter() - t_run,
    }
    if not out["checks_ok"]:
        _say("CHECKS FAILED: " + ", ".join(k for k, v in checks.items() if not v))
    return out


def _gain(opt: dict, other: dict | None) -> float | None:
    if other is None or not other["kl"] > 0:
        return None
    return 100 * (1 - opt["kl"] / other["kl"])


def _budget_rows(result: dict, plans: dict[str, solver.Plan]) -> list[dict]:
    rows = []
    for r in result["budgets"]:
        s = r["strategies"]
        row: dict = {"bpp": float(r["budget"].removesuffix("bpp")), "budget": r["budget"],
                     "budget_bytes": r["budget_bytes"]}
        for key, name in STRATEGIES.items():
            row[key] = {f: s[name][f] for f in FIGURES} if name in s else None
        row["kl_vs_uniform_pct"] = _gain(row["optimal"], row["uniform"])
        row["kl_vs_best_format_pct"] = _gain(row["optimal"], row["best_format"])
        row["others"] = {n: {f: v[f] for f in FIGURES} for n, v in s.items()
                         if n not in STRATEGIES.values()}
        plan = plans[r["budget"]]
        # [bits, rank, factor bits, group size] per planned item, the embedding/head included
        row["optimal_plan"] = {n: _opt(o) for n, o in plan.assignments.items()}
        rows.append(row)
    return rows


def _checks(inv, prof: Profile, plans: dict[str, solver.Plan], result: dict, ex) -> dict:
    """What the figures claim, each recomputed from the model's own inventory (its config and
    safetensors headers) rather than taken from the profile."""
    params = _params(inv)
    shapes = {li.name: (li.out_features, li.in_features) for li in inv.linears}
    vocab = {li.name for li in inv.linears if li.is_vocab}
    rows = {r["budget"]: r for r in result["budgets"]}
    within, every, exact, same, basis = True, True, True, True, True
    for budget, plan in plans.items():
        row, a = rows[budget], plan.assignments
        opt = row["strategies"]["optimal"]
        basis &= row["budget_bytes"] == math.floor(Fraction(budget.removesuffix("bpp"))
                                                   * params / 8)
        within &= opt["bytes"] <= row["budget_bytes"] and all(
            s["bytes"] <= row["budget_bytes"] for s in row["strategies"].values())
        every &= set(a) == set(shapes)
        exact &= opt["bytes"] == plan.total_bytes == inv.kept_bytes + sum(
            option_bytes(*shapes[n], o) for n, o in a.items() if n in shapes)
        same &= row["heatmap"] == {n: [o.bits, o.rank, o.group_size] for n, o in a.items()}
    return {
        "optimal_within_budget": within,
        "budget_bytes_count_every_parameter": basis,
        "profile_covers_every_parameter":
            prof.fixed_bytes == inv.kept_bytes and 2 * params == prof.stats.get("fp16_bytes"),
        "plan_assigns_every_planned_item": every,
        "bytes_are_kept_plus_every_item": exact,
        "experiment_measured_these_plans": same,
        "embedding_in_plan": bool(vocab) and all(vocab <= set(p.assignments)
                                                 for p in plans.values())
        and {lp.name for lp in prof.linears if lp.block is None} == vocab,
        "artifact_bytes_equal_plan":
            ex.metrics["artifact_tensor_bytes"] == ex.metrics["planned_bytes"],
    }
