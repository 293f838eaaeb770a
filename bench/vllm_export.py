"""`bitplan bench compressed-tensors --json`: bitplan's per-module plan for vLLM against the
uniform W4A16 and W8A16 models a team would otherwise serve, each written the same way (our
exporter, our GPTQ rounding) at the same bytes, and every model scored as the libraries load it.

On SmolLM2-135M (`make smollm2`): one compressed-tensors profile (every scheme and LoRA rank
of every linear measured; reused when the data dir has it); the uniform W4A16 (groups of 128
where the rows allow, else 64: SmolLM2's 576-wide inputs take 64 at most) and W8A16 plans;
bitplan's exact plan at each uniform's bytes ("bitplan_profile"), at the W4 bytes also put
through the non-additivity guard (compressor.research.ct_eval: blocks' measured KL shares on
the validation split rescale their α, re-solved; "bitplan" is the guard's plan when it
measured lower there, else the profile's). Every plan is written by execute_ct, then loaded
by transformers' compressed-tensors integration (+ PEFT for an adapter) and scored against the
original model on held-out text (the test split): KL(original ‖ export) per token and top-1
agreement. `max_logit_rel_diff`: the library-loaded model (fp16, as the library decompresses
it, run in float32) against bitplan's own decode of the same files (≤ 1e-3 is the contract), `ties_respected`: q/k/v and gate/up share a scheme in
every written config. vLLM itself does not run here (no GPU): the JSON gives the `vllm serve`
line of each export.

`--quick`: a tiny Llama (bench/tiny_llama.py) and the W4 budget only, the same figures computed
the same way. BITPLAN_BENCH_CT_MODEL: another model directory.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.progress import StageProgress
from bench.tiny_llama import bench_model
from compressor.artifact.ct_export import fused_schemes, serve_command
from compressor.checkpoint.loading import load_tokenizer
from compressor.pipeline.ct_execute import execute_ct
from compressor.pipeline.evaluate import eval_sequences
from compressor.pipeline.execute import ExecuteConfig
from compressor.pipeline.planning import build_problem, uniform_ct_plan
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.research.ct_eval import refine_ct
from service.settings import get_settings
from solver import solve
from solver.ct_schemes import CT_TARGET
from solver.problem import fused_groups

ENV = "BITPLAN_BENCH_CT_MODEL"
EVAL_SEQS, EVAL_LEN = 24, 256           # held-out tokens the libraries' models are scored on
TUNE_SEQS = 4                           # validation sequences the guard measures blocks on
GUARD_BITS = (4,)                       # the rows whose plan goes through the guard
QUICK = {"uniform": (4,), "eval_seqs": 4, "eval_len": 128, "tune_seqs": 2,
         "profile": {"calib_seqs": 8, "fisher_seqs": 4, "seq_len": 128}}


def _say(line: str) -> None:
    print(f"bench compressed-tensors: {line}", file=sys.stderr, flush=True)


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-ct-") as name:
        tmp = Path(name)
        model, source = bench_model(ENV, quick, tmp, tied=True)
        if model is None:
            _say(source)
            return {"error": source}
        return _measure(model, source, quick, tmp)


def _measure(model: Path, source: str, quick: bool, tmp: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.ct_library import compare, library_model, our_model

    cfg = ProfileConfig(target=CT_TARGET, **(QUICK["profile"] if quick else {}))
    _say("profiling for the compressed-tensors target (reused when the data dir has it)")
    t0 = time.perf_counter()
    store = FileProfileStore(get_settings().data_dir / "profiles")
    prof = run_profile(str(model), store, config=cfg, progress=StageProgress(_say, "profile"))
    profile_s = time.perf_counter() - t0
    problem = build_problem(prof)
    linear_params = sum(lp.out_features * lp.in_features for lp in prof.linears)
    seqs = eval_sequences(load_tokenizer(str(model)), QUICK["eval_len"] if quick else EVAL_LEN,
                          QUICK["eval_seqs"] if quick else EVAL_SEQS)
    config = ExecuteConfig(eval_seqs=QUICK["eval_seqs"] if quick else 8,
                           eval_seq_len=QUICK["eval_len"] if quick else EVAL_LEN)
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    groups = fused_groups([lp.name for lp in prof.linears])

    def scored(plan, label: str) -> dict:
        out = tmp / label
        _say(f"{label}: writing {plan.total_bytes:,} bytes of compressed-tensors")
        done = execute_ct(str(model), prof, plan, out, config,
                          StageProgress(_say, f"{label} compress"))
        adapter = (out / "adapter").is_dir()
        _say(f"{label}: loading it with transformers + compressed-tensors"
             + (" + PEFT" if adapter else "") + " and scoring it")
        lib = library_model(out, adapter=adapter)
        got = compare(original, lib, seqs)
        ours = compare(our_model(model, out), lib, seqs)
        config_json = json.loads((out / "config.json").read_text())
        mix = Counter(o.label for o in plan.assignments.values())
        return {"bytes": done.tensor_bytes, "planned_bytes": plan.total_bytes,
                "bits_per_linear_weight": round(8 * (plan.total_bytes - prof.fixed_bytes)
                                                / linear_params, 4),
                "kl": got["kl"], "top1": got["top1"], "tokens": got["tokens"],
                "streamed_kl": done.metrics["kl"], "streamed_kl_seqs": config.eval_seqs,
                "predicted_kl": done.metrics["predicted_kl"],
                "max_logit_rel_diff": ours["max_logit_rel_diff"],
                "ties_respected": fused_schemes(config_json, groups),
                "lora_modules": sum(1 for o in plan.assignments.values() if o.rank),
                "schemes": dict(mix.most_common()), "serve": serve_command(out)}

    rows = []
    for bits in (QUICK["uniform"] if quick else (4, 8)):
        uniform = uniform_ct_plan(problem, bits)
        name = f"W{bits}A16"
        base = scored(uniform, f"uniform-{name}")
        budgeted = problem.with_budget(uniform.total_bytes)
        plan = solve(budgeted, "exact")
        row = {"budget": f"uniform {name}'s bytes", "budget_bytes": uniform.total_bytes,
               "uniform": base, "bitplan_profile": scored(plan, f"bitplan-at-{name}")}
        row["bitplan"] = row["bitplan_profile"]
        if bits in GUARD_BITS:
            _say(f"{name}: the non-additivity guard (each block's measured share of the KL on "
                 "the validation split rescales its α; re-solved, kept only if it measures "
                 "lower there)")
            guard = refine_ct(str(model), prof, budgeted, plan,
                              tune_seqs=QUICK["tune_seqs"] if quick else TUNE_SEQS,
                              progress=StageProgress(_say, f"{name} guard"))
            row["guard"] = {k: v for k, v in guard.items() if k != "plan"}
            if guard["plan"] is not plan:
                row["bitplan"] = scored(guard["plan"], f"bitplan-guarded-at-{name}")
        ours = row["bitplan"]
        row["kl_vs_uniform_pct"] = round(100 * (ours["kl"] / base["kl"] - 1), 2)
        rows.append(row)
        _say(f"{name}: KL {ours['kl']:.4g} vs uniform {base['kl']:.4g} "
             f"({rows[-1]['kl_vs_uniform_pct']:+.1f} %)")
    every = [r[k] for r in rows for k in ("uniform", "bitplan", "bitplan_profile")]
    return {"model": source, "profile_key": prof.key, "profile_s": round(profile_s, 1),
            "fixed_bytes": prof.fixed_bytes, "linear_params": linear_params,
            "eval": {"seqs": len(seqs), "seq_len": int(seqs.shape[1]), "split": "test"},
            "rows": rows, "ties_respected": all(e["ties_respected"] for e in every),
            "max_logit_rel_diff": max(e["max_logit_rel_diff"] for e in every),
            "goal": {"kl_below_uniform_w4_pct": -rows[0]["kl_vs_uniform_pct"], "target_pct": 30},
            "vllm": "not run: no GPU on this machine; each export's `serve` line is what a "
                    "team runs"}
