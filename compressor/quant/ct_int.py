"""compressed-tensors' pack-quantized integer weights (the vLLM target, solver.ct_schemes):
dense int32 packing, Hessian-aware rounding into the symmetric int grid, and the LoRA factors
of an optional L·R correction.

Packing (the library's compressors/pack_quantized, written from its format, not its code): a
row's codes q + 2^(b−1) ∈ [0, 2^b) form one little-endian bit stream, code j at bits
j·b … j·b + b − 1, cut into int32 words; ceil(cols·b/32) words per row.

Rounding: GPTQ / LDLQ (Frantar et al. 2022; rounding.ldlq_many) on the signed grid ŵ = q·s,
columns in their own order (vLLM applies no rotation and no act-order here), a group's fp16
scale fitted when the sweep reaches it. What vLLM and the library compute is ŵ = q·s rounded to
fp16 (dequantize in the scale's dtype), and so is `CTEncoded.w_hat`.

LoRA: the best rank-r correction of the residual E = W − ŵ in the H-norm (Eckart–Young on
E·C, Hd = C·Cᵀ): E·C = U·S·Vᵀ, B = U_r·S_r^½ [rows, r], A = S_r^½·V_rᵀ·C⁻¹ [r, cols], both
cast to fp16 (PEFT's lora_B and lora_A, scaling 1), so y = ŵx + B(Ax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from compressor.quant.gguf_blocks import HessianFactor, hessian_factor
from compressor.quant.hessian import DEFAULT_DAMP, damp_hessian
from compressor.quant.rounding import ldlq_many
from solver.ct_schemes import check_scheme, fits_cols


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, cols] in [0, 2^bits) → int32 [rows, ceil(cols·bits/32)] (dense)."""
    rows, cols = codes.shape
    c = codes.numpy().astype(np.uint8) if codes.dtype == torch.uint8 else codes.numpy()
    words = math.ceil(cols * bits / 32)
    out = np.empty((rows, words), dtype="<i4")
    step = max(1, (1 << 22) // max(cols * bits, 1))
    shifts = np.arange(bits, dtype=np.uint8)
    for r in range(0, rows, step):
        blk = c[r:r + step]
        stream = ((blk[:, :, None] >> shifts) & 1).reshape(len(blk), cols * bits)
        stream = np.pad(stream, ((0, 0), (0, words * 32 - cols * bits)))
        out[r:r + step] = np.packbits(stream, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(out)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 [rows, words] → uint8 codes [rows, cols] (pack_int32's inverse)."""
    p = np.ascontiguousarray(packed.numpy().astype("<i4"))
    stream = np.unpackbits(p.view(np.uint8), axis=1, bitorder="little")[:, :cols * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    codes = (stream.reshape(len(p), cols, bits).astype(np.uint16) * weights).sum(-1)
    return torch.from_numpy(codes.astype(np.uint8))


def dequantize_ct(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    """ŵ = (c − 2^(b−1))·s in fp16, as the library and vLLM compute it → fp16 [rows, cols]."""
    group = codes.shape[1] // scale.shape[1]
    q = codes.float() - float(1 << (bits - 1))
    return (q.unflatten(1, (-1, group)) * scale.float()[..., None]).flatten(1).half()


@dataclass
class CTEncoded:
    bits: int
    group: int
    codes: Tensor            # uint8 [rows, cols], c = q + 2^(b−1)
    scale: Tensor            # fp16 [rows, cols / group]
    lora_a: Tensor | None    # fp16 [rank, cols]
    lora_b: Tensor | None    # fp16 [rows, rank]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def packed(self) -> Tensor:
        return pack_int32(self.codes, self.bits)

    def w_base(self) -> Tensor:
        """The quantized weight as served (fp16)."""
        return dequantize_ct(self.codes, self.scale, self.bits)

    def w_hat(self) -> Tensor:
        """float32 ŵ + B·A: what the served model with its adapter computes."""
        w = self.w_base().float()
        if self.lora_a is not None:
            w += self.lora_b.float() @ self.lora_a.float()
        return w


def lora_factors(E: Tensor, H: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """fp16 (A [rank, cols], B [rows, rank]) of the H-weighted best rank-`rank` E ≈ B·A."""
    Hd = damp_hessian(H.detach().double(), DEFAULT_DAMP)
    C = torch.linalg.cholesky(Hd)
    U, S, Vh = torch.linalg.svd(E.double() @ C, full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    top = root[:, None] * Vh[:rank]
    A = torch.linalg.solve_triangular(C.T, top.T, upper=True).T   # top · C⁻¹
    return A.half(), B.half()


@torch.no_grad()
def round_ct_many(W: Tensor, H: Tensor, schemes: list[tuple[int, int]],
                  factor: HessianFactor | None = None) -> list[tuple[Tensor, Tensor]]:
    """(codes, fp16 scale) of W at every (bits, group) of `schemes`, one stacked GPTQ sweep
    under H (damped as the GGUF encoders damp it: gguf_blocks.hessian_factor)."""
    for bits, group in schemes:
        check_scheme(bits, group)
        if not fits_cols(group, W.shape[1]):
            raise ValueError(f"{bits}-bit groups of {group} do not divide rows of {W.shape[1]}")
    _, U = factor if factor is not None else hessian_factor(H)
    out = ldlq_many(W.detach().float().cpu(), H, schemes, inv_chol=U, signed=True)
    return [(codes, meta.scale) for codes, meta in out]


@torch.no_grad()
def encode_ct(W: Tensor, H: Tensor, bits: int, group: int, rank: int = 0,
              factor: HessianFactor | None = None) -> CTEncoded:
    """W [rows, cols] as one pack-quantized scheme (+ a rank-`rank` LoRA of the residual)."""
    (codes, scale), = round_ct_many(W, H, [(bits, group)], factor)
    enc = CTEncoded(bits, group, codes, scale, None, None)
    if rank:
        enc.lora_a, enc.lora_b = lora_factors(W.float().cpu() - enc.w_base().float(), H, rank)
    return enc
