#!/usr/bin/env bash
# GPU check of the packed runtime (issue 15): the fused Triton dequantize-matmul kernel against
# the torch path (correctness), then its speed on Qwen2-1.5B-shaped layers (out × in = 8960×1536
# and 1536×1536) for decode batches 1 and 8 and a 512-token prefill, against a dense fp16
# matmul of the same layer — one JSON line per stage. Run from the repo root on a CUDA box whose
# python3 has torch (CUDA wheels bring triton):   bash scripts/gpu_check_runtime.sh
# Expected wall time on an H200: about 1–2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" - <<'PY'
import json, statistics, time, traceback
import torch
import torch.nn.functional as F

def emit(**kw):
    print(json.dumps(kw), flush=True)

def stage(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:   # report and go on to the next stage
            emit(stage=name, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])
        else:
            emit(stage=name, done=True, seconds=round(time.perf_counter() - t0, 2))
        return fn
    return wrap

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
import triton
from compressor.runtime.packed import PackedSpec, torch_packed_matmul
from compressor.quant.grids import QuantizedTensor
from compressor.runtime import triton_kernels
emit(stage="env", torch=torch.__version__, triton=triton.__version__,
     device=torch.cuda.get_device_name(0))

SHAPES = [(8960, 1536), (1536, 1536)]
BATCHES = [1, 8, 512]
BITS = [2, 3, 4]
GROUP = 128

def layer(m, n, bits, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    W = torch.randn(m, n, device=dev, generator=g) / n ** 0.5
    qt = QuantizedTensor.quantize(W, bits, GROUP, False)
    spec = PackedSpec(m, n, bits, GROUP, False)
    return qt, spec

def kernel(x, qt, spec):
    return triton_kernels.dequant_matmul(x, qt.packed, qt.meta.scale, qt.meta.zero, spec)

def cuda_time(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)   # µs
    return statistics.median(ts)

@stage("kernel_correctness")
def _():
    for (m, n) in SHAPES:
        for bits in BITS + [16]:
            qt, spec = layer(m, n, bits)
            for T in BATCHES:
                x = torch.randn(T, n, device=dev)
                want = torch_packed_matmul(x, qt.packed, qt.meta.scale, qt.meta.zero, spec)
                got32 = kernel(x, qt, spec)
                got16 = kernel(x.half(), qt, spec)
                scale = want.abs().max().item()
                emit(stage="kernel_correctness", shape=[m, n], bits=bits, batch=T,
                     rel_err_fp32=(got32 - want).abs().max().item() / scale,
                     rel_err_fp16=(got16 - want).abs().max().item() / scale,
                     ok=(got32 - want).abs().max().item() / scale < 1e-4
                        and (got16 - want).abs().max().item() / scale < 2e-2)

@stage("module_correctness")
def _():
    # a whole CompressedLinear on CUDA (Hadamard-rotated Q + rank-64 L·R through the kernel)
    from compressor.quant.decompose import decompose
    from compressor.quant.decomposed import DecompositionConfig, Rounding
    from compressor.runtime.modules import CompressedLinear, Runtime
    from solver.bytes import Option, option_bytes
    for (m, n) in SHAPES:
        W = torch.randn(m, n, device=dev) / n ** 0.5
        H = torch.eye(n, device=dev)
        opt = Option(3, 64, 4, GROUP)
        d = decompose(W, H, opt, DecompositionConfig(q_rounding=Rounding.RTN,
                                                     factor_rounding=Rounding.RTN, lr_iters=1))
        packed = CompressedLinear(d)
        dense = CompressedLinear(d, runtime=Runtime.DENSE)
        for T in BATCHES:
            x = torch.randn(T, n, device=dev)
            ref = dense(x)
            emit(stage="module_correctness", shape=[m, n], batch=T,
                 rel_err_fp32=((packed(x) - ref).abs().max() / ref.abs().max()).item(),
                 rel_err_fp16=((packed(x.half()).float() - dense(x.half()).float()).abs().max()
                               / ref.abs().max()).item(),
                 resident_bytes=packed.nbytes, planned_bytes=option_bytes(m, n, opt))

@stage("kernel_speed")
def _():
    for (m, n) in SHAPES:
        w16 = (torch.randn(m, n, device=dev) / n ** 0.5).half()
        for bits in BITS:
            qt, spec = layer(m, n, bits)
            for T in BATCHES:
                x = torch.randn(T, n, device=dev).half()
                t_kernel = cuda_time(lambda: kernel(x, qt, spec))
                t_dense = cuda_time(lambda: F.linear(x, w16))
                t_torch = cuda_time(lambda: torch_packed_matmul(
                    x.float(), qt.packed, qt.meta.scale, qt.meta.zero, spec), reps=10)
                emit(stage="kernel_speed", shape=[m, n], bits=bits, batch=T,
                     fused_us=round(t_kernel, 1), dense_fp16_us=round(t_dense, 1),
                     torch_path_us=round(t_torch, 1),
                     fused_over_dense_time=round(t_kernel / t_dense, 3),
                     packed_bytes=spec.nbytes, dense_fp16_bytes=2 * m * n)
PY
