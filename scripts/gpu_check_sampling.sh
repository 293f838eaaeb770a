#!/usr/bin/env bash
# GPU check for batched sampling (issue 14, item 3): the profile's 8 Q-only samples of one
# linear, one at a time vs one stacked LDLQ sweep, on Qwen2-1.5B's widths on CUDA, and the
# lazy-batch block-size sweep. Prints one JSON line per measurement (also in $OUT/sampling.jsonl);
# about a minute on an H200, LIMIT caps it. Run from the repo root on a CUDA machine whose
# python3 has torch (+ the project's deps; wheels for what it lacks may sit in .whl/):
#     bash scripts/gpu_check_sampling.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/bitplan-gpu}; mkdir -p "$OUT"
LIMIT=${LIMIT:-280}                      # seconds for the whole script (< 5 min)
export DEVICE=${DEVICE:-cuda}            # DEVICE=cpu SHAPES=96x320 tries the script without a GPU
export SHAPES=${SHAPES:-1536x1536,8960x1536}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
timeout "$LIMIT" python3 - <<'PY' | tee "$OUT/sampling.jsonl"
import json
import os
import statistics

import torch

from compressor.quant.decompose import decompose, q_only_many
from compressor.quant.problem import rotated_problem
from compressor.pipeline.profile import ProfileConfig
from compressor.quant.rounding import lazy_block, ldlq, ldlq_many
from bench.sampling import synthetic_linear, timed


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


dev = torch.device(os.environ["DEVICE"])
if dev.type == "cuda" and not torch.cuda.is_available():
    emit(stage="error", error="no CUDA device")
    raise SystemExit(1)
emit(stage="device", name=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
     torch=torch.__version__, threads=torch.get_num_threads(), default_block=lazy_block(dev))
cfg = ProfileConfig()
opts, dcfg = cfg.q_only_options(), cfg.decomposition
variants = [(o.bits, o.group_size) for o in opts]
W, H = synthetic_linear(256, 384, device=dev.type)      # warm-up: CUDA context, cuBLAS, cuSOLVER
q_only_many(W, H, opts, dcfg)
[decompose(W, H, o, dcfg) for o in opts]


def median_s(fn, reps: int = 3) -> tuple[float, object]:
    runs = [timed(fn, dev) for _ in range(reps)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


cuda = dev.type == "cuda"
for shape in os.environ["SHAPES"].split(","):
    m, n = map(int, shape.split("x"))
    W, H = synthetic_linear(m, n, device=dev.type)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    seq_s, seq = median_s(lambda: [decompose(W, H, o, dcfg) for o in opts])
    bat_s, bat = median_s(lambda: q_only_many(W, H, opts, dcfg))
    rel = max(abs(q.rel_h_err ** 2 - d.rel_h_err ** 2) / d.rel_h_err ** 2
              for q, d in zip(bat, seq, strict=True))
    emit(stage="samples", shape=[m, n], samples=len(opts), sequential_s=round(seq_s, 4),
         batched_s=round(bat_s, 4), speedup=round(seq_s / bat_s, 2), max_rel_diff_t2=rel,
         peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if cuda else None)
    _, _, Wt, _, Hd = rotated_problem(W, H, dcfg)
    lseq_s, lseq = median_s(lambda: [ldlq(Wt, Hd, b, g) for b, g in variants])
    lbat_s, lbat = median_s(lambda: ldlq_many(Wt, Hd, variants))
    differ = sum(int((a[0] != b[0]).sum()) for a, b in zip(lseq, lbat, strict=True))
    emit(stage="rounding", shape=[m, n], ldlq_sequential_s=round(lseq_s, 4),
         ldlq_batched_s=round(lbat_s, 4), ldlq_speedup=round(lseq_s / lbat_s, 2),
         code_mismatch_fraction=differ / (len(variants) * m * n))
    for block in (16, 32, 64, 128, 256, 512):
        t_many, _ = median_s(lambda b=block: ldlq_many(Wt, Hd, variants, block_size=b))
        t_one, _ = median_s(lambda b=block: ldlq(Wt, Hd, 3, 128, block_size=b))
        emit(stage="block_sweep", shape=[m, n], block=block, ldlq_many_s=round(t_many, 4),
             ldlq_single_s=round(t_one, 4))
emit(stage="end")
PY
echo "exit ${PIPESTATUS[0]}"
