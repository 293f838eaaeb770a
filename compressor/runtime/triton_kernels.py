"""Fused dequantize-matmul in Triton: out = x·Ŵᵀ with Ŵ read from its packed codes inside the
K loop, so a dequantized weight only ever exists as one [BLOCK_N, BLOCK_K] register tile.

Code j of a [rows, cols] tensor sits at bits j·b … j·b+b−1 of the LSB-first stream
(compressor/quant/grids.py); with b ≤ 8 it spans at most two bytes, so each code is
((byte[p>>3] | byte[(p>>3)+1] << 8) >> (p & 7)) & (2^b − 1) for p = j·b — the same gather for
every b, no alignment needed. Scales/zeros are fp16 per (row, column group). Accumulation is
float32; the tile product runs in x's dtype (fp16/bf16 tensor cores), or in IEEE fp32 for fp32
inputs, so it matches the torch path to rounding.

Importing this module imports triton (an ImportError where it is not installed: callers fall
back to the torch path). With TRITON_INTERPRET=1 set before import, the same kernel runs on CPU
tensors through Triton's interpreter — how `make test` checks its numbers without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from solver.bytes import FP16_BITS


@triton.jit
def _dequant_matmul_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr,
                           T, N, K, n_groups, n_bytes, stride_x, stride_out,
                           BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                           DENSE16: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :],
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_n[:, None] & mask_k[None, :]
        idx = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        if DENSE16:
            w = tl.load(packed_ptr + idx, mask=wmask, other=0.0).to(tl.float32)
        else:
            bit = idx * BITS
            byte = bit >> 3
            lo = tl.load(packed_ptr + byte, mask=wmask, other=0).to(tl.int32)
            hi = tl.load(packed_ptr + byte + 1, mask=wmask & (byte + 1 < n_bytes),
                         other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
            gidx = offs_n[:, None] * n_groups + offs_k[None, :] // GROUP
            s = tl.load(scale_ptr + gidx, mask=wmask, other=0.0).to(tl.float32)
            if SYMMETRIC:
                z = ((1 << BITS) - 1) / 2.0
            else:
                z = tl.load(zero_ptr + gidx, mask=wmask, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - z) * s
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = out_ptr + offs_t[:, None] * stride_out + offs_n[None, :]
    tl.store(out, acc, mask=mask_t[:, None] & mask_n[None, :])


def dequant_matmul(x: Tensor, packed: Tensor, scale: Tensor | None, zero: Tensor | None,
                   spec, block_n: int = 64, block_k: int = 64) -> Tensor:
    """x [T, cols] · Ŵᵀ → [T, rows] float32 by the fused kernel (x's device: CUDA, or CPU under
    TRITON_INTERPRET=1). `spec` is a compressor.runtime.packed.PackedSpec (not imported: packed.py
    imports this module). fp32 x multiplies in IEEE fp32; fp16/bf16 x in its own dtype."""
    x = x.contiguous()
    T = x.shape[0]
    out = torch.empty(T, spec.rows, device=x.device, dtype=torch.float32)
    dense16 = spec.bits == FP16_BITS
    w = packed.view(torch.float16) if dense16 else packed
    # fp16 scales/zeros may arrive as their int16 bit patterns (CompressedLinear's buffers)
    s = w if scale is None else scale.view(torch.float16)
    z = s if zero is None else zero.view(torch.float16)
    block_t = 16 if T <= 16 else 64   # tl.dot's minimum tile; decode pads its 1–8 rows to 16
    grid = (triton.cdiv(T, block_t), triton.cdiv(spec.rows, block_n))
    _dequant_matmul_kernel[grid](
        x, w, s, z, out, T, spec.rows, spec.cols, spec.n_groups, packed.numel(),
        x.stride(0), out.stride(0),
        BITS=0 if dense16 else spec.bits, GROUP=spec.group_size, SYMMETRIC=spec.symmetric,
        DENSE16=dense16, IEEE=x.dtype == torch.float32,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
