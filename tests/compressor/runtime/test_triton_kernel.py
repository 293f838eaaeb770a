"""The fused Triton dequantize-matmul kernel against the torch path, run on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set in a fresh interpreter before triton is imported).
Skipped only where Triton is not installed (it is in the dev extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from service.settings import REPO_ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (pip install -e '.[dev]')")

SCRIPT = """
import json, torch
from compressor.runtime.packed import PackedSpec, torch_packed_matmul
from compressor.quant.grids import QuantizedTensor
from compressor.runtime.triton_kernels import dequant_matmul
g = torch.Generator().manual_seed(0)
worst, cases = 0.0, 0
for bits in (2, 3, 4, 5, 7, 8, 16):
    for (m, n, gs, sym) in [(37, 29, 8, False), (70, 130, 128, True), (13, 50, 16, False),
                            (64, 96, 32, True)]:
        qt = QuantizedTensor.quantize(torch.randn(m, n, generator=g), bits, gs, sym)
        spec = PackedSpec(m, n, bits, gs, sym)
        scale = None if qt.meta.scale is None else qt.meta.scale.view(torch.int16)
        for T in (1, 8, 20):
            x = torch.randn(T, n, generator=g)
            want = torch_packed_matmul(x, qt.packed, qt.meta.scale, qt.meta.zero, spec)
            got = dequant_matmul(x, qt.packed, scale, qt.meta.zero, spec)
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            cases += 1
        x16 = torch.randn(4, n, generator=g).half()
        want = torch_packed_matmul(x16.float(), qt.packed, qt.meta.scale, qt.meta.zero, spec)
        got16 = dequant_matmul(x16, qt.packed, scale, qt.meta.zero, spec)
        half = ((got16 - want).abs().max() / want.abs().max()).item()
print(json.dumps({"worst_fp32": worst, "cases": cases, "last_fp16": half}))
"""


def test_triton_kernel_matches_torch_path_in_interpreter() -> None:
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cases"] == 7 * 4 * 3
    assert got["worst_fp32"] < 1e-5, got           # IEEE fp32 tile products: rounding only
    assert got["last_fp16"] < 2e-2, got            # fp16 weights × fp16 x, fp32 accumulation
