"""`bitplan bench gguf --json`: bitplan's GGUF against llama.cpp's own mixes, measured by
llama.cpp's own binaries in this run, on SmolLM2-135M (`make smollm2`; `make llama-cpp` builds
the tools).

For each mix (Q2_K, Q3_K_M, Q4_K_M): llama.cpp's converter writes the bf16 reference GGUF;
`llama-imatrix` computes the importance matrix on the calibration text (the very sequences the
bitplan profile calibrates on, decoded to text); `llama-quantize --imatrix` writes the mix;
bitplan plans a type per tensor (exact solver, target gguf) for the mix's tensor bytes, encodes
every tensor itself and writes the GGUF (compressor.pipeline.gguf_execute) — re-planned a few
bytes lower if its file (header, tokenizer, padding) came out above the mix's. Both files are
scored by `llama-perplexity --kl-divergence` against the reference's logits on held-out text
(the test split, which neither side calibrated on) and timed by `llama-bench` (decode
tokens/s, the two interleaved, each the median of its reps). `bitplan_plan_llama_rounding`:
bitplan's plan handed to llama-quantize as a --tensor-type-file (llama.cpp's rounding of our
types), which separates what the plan buys from what our rounding buys.

`--quick`: a tiny Llama (bench/tiny_llama.py) and one mix, the same figures computed the same
way. BITPLAN_BENCH_GGUF_MODEL: another model directory; BITPLAN_BENCH_GGUF_TYPES: the types
bitplan may use (comma-separated, default every type it encodes), e.g. only fast-decoding ones.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bench import llama_cpp
from bench.progress import StageProgress
from bench.tiny_llama import bench_model
from compressor import api
from compressor.artifact.gguf_convert import check_convertible, convert_reference
from compressor.checkpoint.data import Split, load_text
from compressor.checkpoint.loading import load_tokenizer
from compressor.pipeline.execute import ExecuteConfig
from compressor.pipeline.gguf_execute import TYPES_FILE, execute_gguf, gguf_tensor_data_bytes
from compressor.pipeline.profile import ProfileConfig, calibration, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from service.settings import get_settings
from solver.gguf_types import parse_types

ENV, ENV_TYPES = "BITPLAN_BENCH_GGUF_MODEL", "BITPLAN_BENCH_GGUF_TYPES"
MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")
CTX, KLD_CHUNKS = 512, 16              # held-out: 16 chunks × 512 tokens scored by llama.cpp
QUICK = {"mixes": ("Q4_K_M",), "ctx": 64, "chunks": 4, "eval_seqs": 2,
         "profile": {"calib_seqs": 8, "fisher_seqs": 4, "seq_len": 128}}
EVAL_SEQS = 8                           # bitplan's own measurement beside llama.cpp's
SLACK = 64                              # bytes a re-plan steps down per try below the mix


def _say(line: str) -> None:
    print(f"bench gguf: {line}", file=sys.stderr, flush=True)


def _texts(model: Path, cfg: ProfileConfig, tmp: Path, tokens_needed: int) -> tuple[Path, Path]:
    """(calibration text, held-out text) files: the profile's calibration sequences decoded,
    and the test split's start, long enough for `tokens_needed` tokens."""
    tok = load_tokenizer(str(model))
    calib = calibration(tok, cfg)
    calib_file = tmp / "calibration.txt"
    calib_file.write_text("\n".join(tok.decode(s.tolist()) for s in calib), encoding="utf-8")
    text = load_text(Split.TEST)
    ids = tok(text[: 12 * tokens_needed], add_special_tokens=False)["input_ids"]
    held = tmp / "heldout.txt"
    held.write_text(tok.decode(ids[: int(1.15 * tokens_needed)]), encoding="utf-8")
    return calib_file, held


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-gguf-") as name:
        tmp = Path(name)
        try:
            for tool in llama_cpp.TOOLS:
                llama_cpp.llama_cpp_bin(tool)
            model, source = bench_model(ENV, quick, tmp)
            if model is None:
                raise ValueError(source)
            check_convertible(model)
        except (ValueError, FileNotFoundError) as exc:
            _say(str(exc))
            return {"error": str(exc)}
        return _measure(model, source, quick, tmp)


def _measure(model: Path, source: str, quick: bool, tmp: Path) -> dict:
    mixes = QUICK["mixes"] if quick else MIXES
    ctx, chunks = (QUICK["ctx"], QUICK["chunks"]) if quick else (CTX, KLD_CHUNKS)
    cfg = ProfileConfig(target="gguf", **(QUICK["profile"] if quick else {}))
    if os.environ.get(ENV_TYPES):
        cfg = replace(cfg, gguf_types=parse_types(os.environ[ENV_TYPES]))
    tool_log = lambda line: None   # noqa: E731 (llama.cpp's own lines: too many to echo)
    calib_file, held = _texts(model, cfg, tmp, ctx * chunks)
    _say("converting to the bf16 reference GGUF (llama.cpp's converter)")
    ref = convert_reference(model, tmp / "reference.gguf")
    _say("llama-imatrix on the calibration text")
    imat = llama_cpp.imatrix(ref, calib_file, tmp / "imatrix.gguf", ctx=ctx, progress=tool_log)
    base = llama_cpp.kld_base(ref, held, tmp / "reference.kld", ctx=ctx, chunks=chunks,
                              progress=tool_log)
    _say("profiling for the GGUF target (reused when the data dir has it)")
    t0 = time.perf_counter()
    store = FileProfileStore(get_settings().data_dir / "profiles")
    prof = run_profile(str(model), store, config=cfg, progress=StageProgress(_say, "profile"))
    profile_s = time.perf_counter() - t0
    problem = api.problem(prof)
    config = ExecuteConfig(eval_seqs=QUICK["eval_seqs"] if quick else EVAL_SEQS)
    rows = []
    for mix in mixes:
        _say(f"{mix}: llama-quantize with the imatrix")
        theirs = tmp / f"llama-{mix}.gguf"
        llama_cpp.quantize(ref, theirs, mix, imatrix=imat, progress=tool_log)
        their_bytes = theirs.stat().st_size
        budget = gguf_tensor_data_bytes(theirs)
        _say(f"{mix}: bitplan's plan at {budget:,} tensor bytes, encoded and written")
        for _ in range(8):   # the file's overhead may differ by a few padding bytes
            plan = api.plan(prof, budget, base=problem)
            done = execute_gguf(str(model), prof, plan, tmp / f"bitplan-{mix}", config,
                                StageProgress(_say, f"{mix} compress"), reference=ref)
            excess = done.artifact.stat().st_size - their_bytes
            if excess <= 0:
                break
            budget -= excess + SLACK
        ours = done.artifact
        ours_llama = tmp / f"bitplan-plan-llama-rounding-{mix}.gguf"
        llama_cpp.quantize(ref, ours_llama, "Q8_0", imatrix=imat,
                           tensor_type_file=done.artifact.parent / TYPES_FILE, progress=tool_log)
        scores = {k: llama_cpp.kld(p, tmp / "reference.kld", ctx=ctx, chunks=chunks,
                                   progress=tool_log)
                  for k, p in (("llama_cpp", theirs), ("bitplan", ours),
                               ("plan_llama_rounding", ours_llama))}
        speeds = _decode_speeds({"llama_cpp": theirs, "bitplan": ours}, quick)
        rows.append(_row(mix, theirs, ours, ours_llama, scores, speeds, plan, done))
        _say(f"{mix}: KLD llama.cpp {scores['llama_cpp']['kld']:.4f} vs bitplan "
             f"{scores['bitplan']['kld']:.4f} at {their_bytes:,} / "
             f"{ours.stat().st_size:,} bytes")
    return {"model": {"path": str(model), "source": source}, "ctx": ctx, "chunks": chunks,
            "gguf_types": list(cfg.gguf_types),
            "reference_ppl": base.get("ppl"), "profile_s": round(profile_s, 1),
            "sizes": rows, "summary": _summary(rows)}


def _decode_speeds(files: dict[str, Path], quick: bool) -> dict[str, float]:
    """tokens/s of each file, the runs interleaved (A B A B) so drift hits both alike; the
    median of each side's rounds."""
    rounds = 1 if quick else 3
    got: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(rounds):
        for k, p in files.items():
            got[k].append(llama_cpp.bench_decode(p, n_gen=16 if quick else 64, reps=3))
    return {k: sorted(v)[len(v) // 2] for k, v in got.items()}


def _planned_types(path: Path) -> dict[str, str]:
    """The 2-D tensors' types in a GGUF file (the kept 1-D ones are F32 in every file)."""
    return {n: t for n, t in llama_cpp.quantized_types(path).items() if t != "F32"}


def _row(mix, theirs, ours, ours_llama, scores, speeds, plan, done) -> dict:
    types = _planned_types(ours)
    pick = ("kld", "ppl", "same_top", "kld_p99")
    return {
        "size": mix,
        "llama_cpp": {"mix": mix, "file_bytes": theirs.stat().st_size,
                      **{k: scores["llama_cpp"].get(k) for k in pick},
                      "tok_s": speeds["llama_cpp"],
                      "type_counts": _counts(_planned_types(theirs))},
        "bitplan": {"file_bytes": ours.stat().st_size,
                    **{k: scores["bitplan"].get(k) for k in pick}, "tok_s": speeds["bitplan"],
                    "predicted_kl": plan.predicted_error, "measured_kl_ours": done.metrics["kl"],
                    "type_counts": _counts(types), "types": types},
        "bitplan_plan_llama_rounding": {"file_bytes": ours_llama.stat().st_size,
                                        **{k: scores["plan_llama_rounding"].get(k)
                                           for k in pick}},
        "kld_vs_llama_cpp": scores["bitplan"]["kld"] / scores["llama_cpp"]["kld"] - 1,
    }


def _counts(types: dict[str, str]) -> dict[str, int]:
    return dict(sorted(Counter(types.values()).items()))


def _summary(rows: list[dict]) -> dict:
    ratios = [r["kld_vs_llama_cpp"] for r in rows]
    return {"kld_vs_llama_cpp": ratios, "never_worse": all(x <= 0 for x in ratios),
            "never_larger": all(r["bitplan"]["file_bytes"] <= r["llama_cpp"]["file_bytes"]
                                for r in rows),
            "decode_ratio": [r["bitplan"]["tok_s"] / r["llama_cpp"]["tok_s"] for r in rows]}
