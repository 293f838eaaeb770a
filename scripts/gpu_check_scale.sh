#!/usr/bin/env bash
# Issue 14 GPU check: the full-quality (default ProfileConfig) profile and a uniform compression
# of a synthetic checkpoint with Qwen2-1.5B's shapes (28 blocks, hidden 1536, intermediate 8960,
# 12/2 heads, vocab 151936; fp16 shards), streamed block by block on CUDA. Prints one JSON line
# per stage (and per profiled block) with seconds and peak GPU / host memory. Run from the repo
# root on a CUDA machine whose python3 has torch + transformers:  bash scripts/gpu_check_scale.sh
# BLOCKS=n profiles only the first n blocks' linears (the rest are still streamed through).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${LIMIT:-480}
timeout "$LIMIT" python3 - <<'PY'
import json, os, tempfile, time
from pathlib import Path

import torch

import solver
from compressor.pipeline.execute import ExecuteConfig, execute_plan
from compressor.checkpoint.loading import load_tokenizer
from compressor.checkpoint.memory import peak_gpu_bytes, peak_rss_bytes
from compressor.pipeline.profile import ProfileConfig, calibration, stream_inventory, sweep_blocks
from compressor.pipeline.profile import tensor_hash, weights_hash_of
from compressor.pipeline.profile_store import FileProfileStore, profile_key
from compressor.checkpoint.stream import StreamedModel
from bench.synthetic import QWEN2_1_5B, write_checkpoint
from solver.bytes import Option

dev = "cuda"
def line(stage, t0, **kw):
    print(json.dumps({"stage": stage, "s": round(time.perf_counter() - t0, 2),
                      "peak_gpu_bytes": peak_gpu_bytes(dev), "peak_rss_bytes": peak_rss_bytes(),
                      **kw}), flush=True)

print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    model = str(write_checkpoint(Path(tmp) / "qwen2-1.5b-shapes", QWEN2_1_5B))
    line("write_checkpoint", t0, params=QWEN2_1_5B.params())
    cfg = ProfileConfig()
    t0 = time.perf_counter()
    sm = StreamedModel(model, device=dev)
    calib = calibration(load_tokenizer(model), cfg)
    key = profile_key(weights_hash_of(model), tensor_hash(calib), cfg.to_dict())
    inv = stream_inventory(sm)
    store = FileProfileStore(Path(tmp) / "profiles")
    blocks = range(int(os.environ.get("BLOCKS", sm.num_blocks)))
    tb = [time.perf_counter()]
    def progress(stage, frac):
        if stage.startswith("block"):
            line(stage, tb[0]); tb[0] = time.perf_counter()
    sweep = sweep_blocks(sm, calib, cfg, key, store, inv, blocks=blocks, report=progress)
    line("profile", t0, blocks=len(blocks), stage_s=sweep.timings)
    # compress every linear (uniform 4-bit, rank 64); predicted KL over the profiled linears
    from compressor.pipeline.profile_store import Profile
    prof = Profile(key, model, "", "", cfg.to_dict(), inv.kept_bytes,
                   list(store.linear_records(key).values()))
    plan = solver.Plan({li.name: Option(4, 64) for li in inv.linears}, 0, 0.0, "uniform", False)
    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    tl = [time.perf_counter(), 0.0]
    def compressing(stage, frac):   # one line per ~5 % of the linears: seconds per linear
        if stage == "linears" and frac - tl[1] >= 0.05:
            line(f"linears {frac:.0%}", tl[0]); tl[0], tl[1] = time.perf_counter(), frac
    done = execute_plan(model, prof, plan, Path(tmp) / "artifact",
                        ExecuteConfig(device=dev, eval_seq_len=256, eval_seqs=16),
                        progress=compressing)
    m = done.metrics
    line("compress+save+evaluate", t0, stage_s=m["stage_s"], ppl=m["ppl"], kl=m["kl"],
         artifact_tensor_bytes=m["artifact_tensor_bytes"])
PY
