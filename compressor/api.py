"""bitplan's front door: the whole loop in four calls (one entry point each, as torchao's
`quantize_(model, config)` and llm-compressor's `oneshot` are), used by the CLI, the job stages
and the benchmarks alike.

    from compressor import api
    prof = api.profile("models/bitplan-demo")            # once per model; stored, then reused
    plan = api.plan(prof, "2.75bpp")                     # exact solver, every byte counted
    art = api.compress("models/bitplan-demo", prof, plan, "out/")  # artifact, measured
    model, tokenizer = api.load(art)                      # packed linears, through transformers

Importing this module is cheap and torch-free (the API server plans through it); `profile`,
`compress` and `load` import the torch-backed pipeline when first called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import solver
from compressor.pipeline.planning import MenuConfig, build_problem
from compressor.pipeline.profile_store import (
    FileProfileStore,
    Profile,
    ProfileStore,
    seed_shipped_profile,
)
from solver import AllocationProblem, Constraints, Plan

if TYPE_CHECKING:   # annotations only: importing these at run time would load torch
    from compressor.pipeline.execute import CompressStore, ExecuteConfig, Executed
    from compressor.pipeline.profile import ProfileConfig, ProfileSource

Progress = Callable[[str, float], None]

__all__ = ["Plan", "Profile", "compress", "default_store", "load", "plan", "problem", "profile"]


def default_store() -> FileProfileStore:
    """Profiles of scripts that name no store: $XDG_CACHE_HOME/bitplan/profiles (~/.cache)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return FileProfileStore(cache / "bitplan" / "profiles")


def _as_store(store: ProfileStore | str | Path | None) -> ProfileStore:
    if store is None:
        return default_store()
    return FileProfileStore(Path(store)) if isinstance(store, str | Path) else store


def profile(model_ref: str | Path, config: ProfileConfig | None = None, *,
            store: ProfileStore | str | Path | None = None, device: str = "cpu",
            trust_remote_code: bool = False, progress: Progress | None = None,
            source: ProfileSource | None = None) -> Profile:
    """Profile a model once: per-linear sensitivity α_i and fitted error models E_i(b, r),
    streamed block by block. The profile is keyed by (weights, calibration set, config, code
    version); a stored one with the same key (or one shipped beside the model, as the demo's
    is) is returned without touching the weights again, and an interrupted run resumes per
    linear from `store` (a directory, a ProfileStore, or `default_store()`)."""
    from compressor.pipeline.profile import run_profile  # torch

    store = _as_store(store)
    seed_shipped_profile(store, model_ref)   # used only if its key matches
    return run_profile(str(model_ref), store, device=device, trust_remote_code=trust_remote_code,
                       progress=progress, config=config, source=source)


def problem(profile: Profile, budget: str | int | float | None = None,
            constraints: Mapping | Constraints | None = None,
            menu: MenuConfig | None = None) -> AllocationProblem:
    """The allocation problem of a profile: each linear's menu of (bits, rank, factor bits,
    group size) with exact bytes and predicted damage α_i·E_i; `budget` (bytes, "850MiB",
    "3.25bpp", "0.22x") may be None for the budget-free problem."""
    return build_problem(profile, budget, constraints, menu)


def plan(profile: Profile, budget: str | int | float,
         constraints: Mapping | Constraints | None = None, *,
         method: solver.Method | str = solver.Method.EXACT, menu: MenuConfig | None = None,
         base: AllocationProblem | None = None, time_limit_s: float = 10.0) -> Plan:
    """The optimal plan for `budget`: min Σ α_i·E_i(b_i, r_i) s.t. Σ bytes_i + kept ≤ budget
    (solver.solve: exact multiple-choice knapsack, or CP-SAT). A budget below the cheapest plan
    raises solver.budget.InfeasibleBudget with the feasible range. `base`: the budget-free
    problem of (profile, constraints), when the caller already holds it (a server caches
    them)."""
    prob = base.with_budget(budget) if base is not None else \
        build_problem(profile, budget, constraints, menu)
    return solver.solve(prob, method=solver.Method(method), time_limit_s=time_limit_s)


def compress(model_ref: str | Path, profile: Profile, plan: Plan, out: str | Path, *,
             config: ExecuteConfig | None = None, store: CompressStore | None = None,
             progress: Progress | None = None) -> Executed:
    """Compress `model_ref` by `plan` into the artifact directory `out` (streamed, one block
    resident; written atomically), then measure it against the original on the test split.
    The result holds the artifact's path, its manifest (tensor bytes = planned bytes) and the
    metrics: ppl, kl, top1, predicted_kl. `store` keeps finished linears so a rerun resumes.
    A GGUF profile's plan (target gguf) is written as `out`/model.gguf instead, for llama.cpp
    (compressor.pipeline.gguf_execute; no store: encoding a tensor costs less than storing
    it), and a compressed-tensors one (target compressed-tensors) as the model directory `out`
    vLLM serves, with `out`/adapter for its LoRA (compressor.pipeline.ct_execute)."""
    if profile.config.get("target") == "compressed-tensors":
        from compressor.pipeline.ct_execute import execute_ct  # torch

        return execute_ct(str(model_ref), profile, plan, Path(out), config, progress)
    if profile.config.get("target") == "gguf":
        from compressor.pipeline.gguf_execute import execute_gguf  # torch

        return execute_gguf(str(model_ref), profile, plan, Path(out), config, progress)
    from compressor.pipeline.execute import execute_plan  # torch

    return execute_plan(str(model_ref), profile, plan, Path(out), config, store, progress)


def load(artifact: Executed | str | Path, *, device: str = "cpu", dense: bool = False,
         verify: bool = True):
    """(model, tokenizer) of an artifact through `AutoModelForCausalLM.from_pretrained` with
    bitplan's registered quantizer (no remote code): linears stay packed at the planned bytes;
    `dense=True` caches each Ŵ instead (fast evaluation, full-size memory)."""
    from compressor.artifact.native import load_compressed  # torch, transformers
    from compressor.runtime.modules import Runtime

    path = artifact if isinstance(artifact, str | Path) else artifact.artifact
    return load_compressed(path, device, verify=verify,
                           runtime=Runtime.DENSE if dense else Runtime.PACKED)
