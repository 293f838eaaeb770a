"""ggml's 256-element k-quants (Q2_K … Q6_K), and the block machinery every GGUF type shares.

Shared (used by `gguf_blocks` for the 32-element types too):
- `Codec`: one type's block format — a block of `block` elements is stored as codes on a grid
  of `levels` plus, per `group` consecutive elements, a float32 scale s and offset o that are
  exactly what ggml's dequantizer computes from the stored fields, so x̂ = s·levels[code] + o
  in float32 reproduces gguf-py's `dequantize` bit for bit;
- the importance-weighted scale searches (llama.cpp's make_qx_quants / make_qkx2_quants idea,
  our own code, vectorised over every group at once): a few candidate scales per group, each
  followed by the weighted least-squares refit of scale (and min) to the codes it rounds to,
  keeping the one with the least Σ_j w_j (x_j − x̂_j)² (w = diag H: llama.cpp's imatrix).

K-quants: a super-block of 256 elements holds 8 or 16 sub-blocks whose float scales (and
mins) are themselves quantized — 4/6/8-bit integers times one fp16 super-scale. The sub-block
parameters are searched in float first, then quantized against the fp16-rounded super-scales;
the codes are always rounded against the decoded (quantized) parameters.

Layouts: ggml/src/ggml-common.h `block_q2_K` … `block_q6_K` (field order), the bit placement
as gguf-py 0.19 `gguf/quants.py` `Q2_K.dequantize_blocks` … `Q6_K.dequantize_blocks` (and
ggml-quants.c `dequantize_row_q*_K`) read it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

QK_K = 256


# ---- shared helpers -----------------------------------------------------------------------

def fp16(x: Tensor) -> Tensor:
    """The fp16 value a stored scale decodes to, as float32 (finite: clamped to ±65504)."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def f16_bytes(x: Tensor) -> Tensor:
    """float32 [...] already fp16-exact → uint8 [..., 2], little-endian (ggml_half)."""
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def f16_read(b: Tensor) -> Tensor:
    """uint8 [..., 2] → float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def bits_in(v: Tensor, shifts: list[int], dim: int) -> Tensor:
    """Σ_k v[..k..] << shifts[k] along `dim` (the values must not overlap) → uint8."""
    sh = torch.tensor(shifts, dtype=torch.int64).view(-1, *([1] * (v.dim() - dim - 1)))
    return (v.to(torch.int64) << sh).sum(dim).to(torch.uint8)


def bits_out(b: Tensor, shifts: list[int], mask: int, dim: int) -> Tensor:
    """Inverse of `bits_in`: a new axis at `dim` holding (b >> shifts[k]) & mask, int64."""
    sh = torch.tensor(shifts, dtype=torch.int64).view(-1, *([1] * (b.dim() - dim)))
    return (b.to(torch.int64).unsqueeze(dim) >> sh) & mask


def _signed_absmax(x: Tensor) -> Tensor:
    """The element of largest magnitude along the last dim, with its sign → [..., 1]."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


SYM_STEPS = torch.arange(-9, 10, dtype=torch.float64) / 10     # make_qx_quants' 19 tries
AFFINE_STEPS = torch.arange(-10, 11, dtype=torch.float64) / 10  # make_qkx2_quants' 21 tries


def search_sym(x: Tensor, w: Tensor, nmax: float, lo: int, hi: int, sign: int = -1) -> Tensor:
    """Scale s per group (last dim) for x̂ = s·q, integer q ∈ [lo, hi], minimising
    Σ w (x − x̂)²: try inverse scales sign·(nmax + δ)/max (sign −1: the signed extreme lands
    near −nmax, the wider side of ggml's grids), round, refit s = Σwxq / Σwq² and keep the try
    with the largest (Σwxq)²/Σwq². → [...]"""
    mx = _signed_absmax(x)
    inv = sign * (nmax + SYM_STEPS.to(x)) / torch.where(mx == 0, torch.ones_like(mx), mx)
    inv = torch.where(mx == 0, torch.zeros_like(inv), inv)                     # [..., C]
    q = (x.unsqueeze(-2) * inv.unsqueeze(-1)).round_().clamp_(lo, hi)         # [..., C, G]
    return _refit_sym(x, w, q)


def search_table(x: Tensor, w: Tensor, levels: Tensor, steps: int = 7) -> Tensor:
    """`search_sym` on a non-uniform sorted grid `levels` (IQ4_NL's kvalues): tries put the
    signed extreme near either end of the grid, ±`steps` grid units. → scale [...]"""
    mx = _signed_absmax(x)
    lv = levels.to(x)
    d = torch.arange(-steps, steps + 1, dtype=x.dtype)
    targets = torch.cat([lv[0] + d, lv[-1] - d])
    inv = targets / torch.where(mx == 0, torch.ones_like(mx), mx)
    inv = torch.where(mx == 0, torch.zeros_like(inv), inv)
    # nearest level of t = x·inv (|t| ≤ max |targets|) from a table on a 1/4 grid: off only
    # within 1/8 of a midpoint, which the search does not mind (the final codes are exact)
    span = int(targets.abs().max().ceil()) + 1
    lut = lv[torch.bucketize(torch.arange(-4 * span, 4 * span + 1, dtype=x.dtype) / 4,
                             (lv[1:] + lv[:-1]) / 2)]
    t = x.unsqueeze(-2) * inv.unsqueeze(-1)
    idx = t.mul_(4).round_().add_(4 * span).clamp_(0, 8 * span).to(torch.int64)
    return _refit_sym(x, w, torch.take(lut, idx))


def _refit_sym(x: Tensor, w: Tensor, q: Tensor) -> Tensor:
    wq = w.unsqueeze(-2) * q
    sumlx = (wq * x.unsqueeze(-2)).sum(-1)
    suml2 = (wq * q).sum(-1)
    ok = suml2 > 0
    safe = torch.where(ok, suml2, torch.ones_like(suml2))
    score = torch.where(ok, sumlx * sumlx / safe, torch.zeros_like(sumlx))
    best = score.argmax(-1, keepdim=True)
    return torch.where(ok, sumlx / safe, torch.zeros_like(sumlx)).gather(-1, best).squeeze(-1)


def search_affine(x: Tensor, w: Tensor, nmax: int, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    """(s, m) per group for x̂ = s·q + m, q ∈ [0, nmax], minimising Σ w (x − x̂)²: tries
    inverse scales (nmax + δ)/(max − min), rounds, refits (s, m) by weighted least squares and
    keeps the least error. `min_le_zero`: the k-quants' m ≤ 0 (they store −m ≥ 0); s ≥ 0."""
    mn = x.amin(-1, keepdim=True)
    if min_le_zero:
        mn = mn.clamp(max=0)
    rng = x.amax(-1, keepdim=True) - mn
    inv = (nmax + AFFINE_STEPS.to(x)) / torch.where(rng > 0, rng, torch.ones_like(rng))
    inv = torch.where(rng > 0, inv, torch.zeros_like(inv))                       # [..., C]
    xc = x.unsqueeze(-2)
    q = ((xc - mn.unsqueeze(-1)) * inv.unsqueeze(-1)).round_().clamp_(0, nmax)  # [..., C, G]
    wc = w.unsqueeze(-2).expand_as(q)
    sw = wc.sum(-1)
    wq = wc * q
    sx, sq = (wc * xc).sum(-1), wq.sum(-1)
    sqq, sxq = (wq * q).sum(-1), (wq * xc).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (sw * sxq - sx * sq) / safe, torch.zeros_like(det))
    m = torch.where(ok, (sqq * sx - sq * sxq) / safe, sx / sw)
    if min_le_zero:
        pos = m > 0
        s = torch.where(pos, sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
    s = s.clamp(min=0)
    err = (wc * (xc - s.unsqueeze(-1) * q - m.unsqueeze(-1)).square()).sum(-1)
    best = err.argmin(-1, keepdim=True)
    return s.gather(-1, best).squeeze(-1), m.gather(-1, best).squeeze(-1)


class Codec:
    """One GGUF block type. Subclasses set the class attributes and `fit` / `pack` / `unpack`:
    fit(x [R, nb, block], w [nb, block]) → (fields, s, o) with s, o [R, nb, block // group]
    the decoded float32 parameters; pack(codes [R, nb, block] int64, fields) → uint8
    [R, nb, block_bytes]; unpack(bytes) → (codes, s, o)."""

    name: str
    block: int
    group: int
    levels: Tensor          # float32 value of each code
    uniform: bool = True    # levels = code − zp
    zp: int = 0

    def fit(self, x: Tensor, w: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        raise NotImplementedError

    def pack(self, codes: Tensor, f: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def unpack(self, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def round(self, x: Tensor, s: Tensor, o: Tensor) -> Tensor:
        """Nearest code to x on the grid s·levels + o (s, o broadcast against x) → int64."""
        ok = s != 0
        t = torch.where(ok, (x - o) / torch.where(ok, s, torch.ones_like(s)),
                        torch.zeros_like(x))
        if self.uniform:
            return (t.round() + self.zp).clamp_(0, len(self.levels) - 1).to(torch.int64)
        lv = self.levels.to(t)
        return torch.bucketize(t, (lv[1:] + lv[:-1]) / 2)

    def expand(self, p: Tensor) -> Tensor:
        """Per-group [..., nb, block // group] → per-element [..., nb, block]."""
        return p.repeat_interleave(self.group, dim=-1)

    def decode(self, codes: Tensor, s: Tensor, o: Tensor) -> Tensor:
        """x̂ = s·level + o in float32, gguf-py's arithmetic exactly ([..., nb, block])."""
        lv = self.levels[codes.unflatten(-1, (-1, self.group))]
        return (s.unsqueeze(-1) * lv + o.unsqueeze(-1)).flatten(-2)


def _uniform(lo: int, hi: int) -> Tensor:
    return torch.arange(lo, hi + 1, dtype=torch.float32)


def _quantize_scales(v: Tensor, imp: Tensor, nmax: int, lo: int, hi: int,
                     signed: bool) -> tuple[Tensor, Tensor]:
    """Sub-block floats v [..., k] → (fp16 super-scale D [...], ints [..., k] in [lo, hi]),
    v ≈ D·int: D by `search_sym` on v weighted by `imp` (how much each sub-block's error costs
    per unit² of its scale: Σ w q²; of its min: Σ w), the ints rounded against the fp16 D."""
    D = fp16(search_sym(v, imp, float(nmax), lo, hi, sign=-1 if signed else 1)).unsqueeze(-1)
    ints = torch.where(D != 0, v / torch.where(D != 0, D, torch.ones_like(D)), torch.zeros_like(v))
    return D.squeeze(-1), ints.round().clamp(lo, hi)


def _codes_sq(x: Tensor, w: Tensor, s: Tensor, m: Tensor, lo: int, hi: int) -> Tensor:
    """Σ w q² per group for the nearest codes q of x on s·q + m: a scale's importance."""
    s_ = s.unsqueeze(-1)
    q = torch.where(s_ > 0, (x - m.unsqueeze(-1)) / torch.where(s_ > 0, s_, torch.ones_like(s_)),
                    torch.zeros_like(x)).round().clamp(lo, hi)
    return (w * q * q).sum(-1)


class _AffineK(Codec):
    """Q2_K / Q4_K / Q5_K: x̂ = (d·sc)·q − dmin·mn, q ∈ [0, qmax], sc, mn ∈ [0, smax]."""

    block, uniform, zp = QK_K, True, 0
    qmax: int
    smax: int

    def fit(self, x, w):
        R, nb, _ = x.shape
        k = QK_K // self.group
        xs, ws = x.reshape(R, nb, k, self.group), w.reshape(nb, k, self.group)
        s, m = search_affine(xs, ws, self.qmax, min_le_zero=True)
        imp = _codes_sq(xs, ws, s, m, 0, self.qmax)
        d, sc = _quantize_scales(s, imp, self.smax, 0, self.smax, signed=False)
        dmin, mn = _quantize_scales(-m, ws.sum(-1).expand_as(m), self.smax, 0, self.smax,
                                    signed=False)
        f = {"d": d, "dmin": dmin, "sc": sc.to(torch.int64), "mn": mn.to(torch.int64)}
        return (f, *self._params(d, dmin, f["sc"], f["mn"]))

    def _params(self, d, dmin, sc, mn):
        return d.unsqueeze(-1) * sc.to(torch.float32), -(dmin.unsqueeze(-1) * mn.to(torch.float32))


class Q2K(_AffineK):
    """block_q2_K: scales[16] (low nibble sc, high nibble mn) | qs[64] | d | dmin = 84 bytes.
    Element e = h·128 + s·32 + l sits in bits 2s of qs[h·32 + l]; sub-blocks of 16."""

    name, group, qmax, smax = "Q2_K", 16, 3, 15
    levels = _uniform(0, 3)

    def pack(self, codes, f):
        R, nb, _ = codes.shape
        scales = (f["sc"] | (f["mn"] << 4)).to(torch.uint8)
        qs = bits_in(codes.reshape(R, nb, 2, 4, 32), [0, 2, 4, 6], dim=3).reshape(R, nb, 64)
        return torch.cat([scales, qs, f16_bytes(f["d"]), f16_bytes(f["dmin"])], -1)

    def unpack(self, b):
        R, nb, _ = b.shape
        sc, mn = b[..., :16].to(torch.int64) & 15, b[..., :16].to(torch.int64) >> 4
        codes = bits_out(b[..., 16:80].reshape(R, nb, 2, 32), [0, 2, 4, 6], 3, dim=3)
        s, o = self._params(f16_read(b[..., 80:82]), f16_read(b[..., 82:84]), sc, mn)
        return codes.reshape(R, nb, QK_K), s, o


def _pack_scales12(sc: Tensor, mn: Tensor) -> Tensor:
    """Q4_K/Q5_K's 12 bytes of 8 six-bit scales and mins (ggml get_scale_min_k4's inverse):
    j < 4: bytes j, 4+j hold sc_j, mn_j in bits 0-5 and the top 2 bits of sc_{j+4}, mn_{j+4}
    in bits 6-7; bytes 8+j hold the low nibbles of sc_{j+4} | mn_{j+4} << 4."""
    a, b = sc[..., :4], sc[..., 4:]
    c, e = mn[..., :4], mn[..., 4:]
    return torch.cat([a | ((b >> 4) << 6), c | ((e >> 4) << 6), (b & 15) | ((e & 15) << 4)],
                     -1).to(torch.uint8)


def _unpack_scales12(b: Tensor) -> tuple[Tensor, Tensor]:
    b = b.to(torch.int64)
    lo, mi, hi = b[..., :4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1)
    mn = torch.cat([mi & 63, (hi >> 4) | ((mi >> 6) << 4)], -1)
    return sc, mn


class Q4K(_AffineK):
    """block_q4_K: d | dmin | scales[12] | qs[128] = 144 bytes; sub-blocks of 32; element
    e = c·64 + h·32 + l is nibble h of qs[c·32 + l]."""

    name, group, qmax, smax = "Q4_K", 32, 15, 63
    levels = _uniform(0, 15)

    def pack(self, codes, f):
        R, nb, _ = codes.shape
        qs = bits_in(codes.reshape(R, nb, 4, 2, 32) & 15, [0, 4], dim=3).reshape(R, nb, 128)
        return torch.cat([f16_bytes(f["d"]), f16_bytes(f["dmin"]),
                          _pack_scales12(f["sc"], f["mn"]), *self._extra(codes), qs], -1)

    def _extra(self, codes):
        return []

    def unpack(self, b):
        R, nb, _ = b.shape
        sc, mn = _unpack_scales12(b[..., 4:16])
        codes = bits_out(b[..., -128:].reshape(R, nb, 4, 32), [0, 4], 15, dim=3)
        codes = codes.reshape(R, nb, QK_K) | self._high(b)
        s, o = self._params(f16_read(b[..., 0:2]), f16_read(b[..., 2:4]), sc, mn)
        return codes, s, o

    def _high(self, b):
        return 0


class Q5K(Q4K):
    """block_q5_K: d | dmin | scales[12] | qh[32] | qs[128] = 176 bytes: Q4_K's low nibbles,
    the 5th bit of element e = b·32 + l in bit b of qh[l]."""

    name, qmax, smax = "Q5_K", 31, 63
    levels = _uniform(0, 31)

    def _extra(self, codes):
        R, nb, _ = codes.shape
        return [bits_in(codes.reshape(R, nb, 8, 32) >> 4, list(range(8)), dim=2)]

    def _high(self, b):
        R, nb, _ = b.shape
        return bits_out(b[..., 16:48], list(range(8)), 1, dim=2).reshape(R, nb, QK_K) << 4


class _SymK(Codec):
    """Q3_K / Q6_K: x̂ = (d·sc)·(code − zp), signed sub-block scales sc; sub-blocks of 16."""

    block, group, uniform = QK_K, 16, True
    smin: int
    smax: int

    def fit(self, x, w):
        R, nb, _ = x.shape
        xs, ws = x.reshape(R, nb, 16, 16), w.reshape(nb, 16, 16)
        lo, hi = -self.zp, len(self.levels) - 1 - self.zp
        s = search_sym(xs, ws, float(self.zp), lo, hi)
        imp = _codes_sq(xs.abs(), ws, s.abs(), torch.zeros_like(s), 0, max(-lo, hi))
        d, sc = _quantize_scales(s, imp, -self.smin, self.smin, self.smax, signed=True)
        s = d.unsqueeze(-1) * sc.to(torch.float32)
        return {"d": d, "sc": sc.to(torch.int64)}, s, torch.zeros_like(s)


class Q3K(_SymK):
    """block_q3_K: hmask[32] | qs[64] | scales[12] | d = 110 bytes; code = level + 4 ∈ 0…7:
    bits 0-1 as Q2_K's qs, bit 2 of element e = b·32 + l in bit b of hmask[l]; sc + 32 ∈ 0…63
    as 6 bits: low nibbles j < 8 in byte j, j ≥ 8 in byte j−8's high nibble, the top 2 bits
    of j = 4·t + k at bits 2t of byte 8 + k."""

    name, zp, smin, smax = "Q3_K", 4, -32, 31
    levels = _uniform(-4, 3)

    def pack(self, codes, f):
        R, nb, _ = codes.shape
        hmask = bits_in(codes.reshape(R, nb, 8, 32) >> 2, list(range(8)), dim=2)
        qs = bits_in(codes.reshape(R, nb, 2, 4, 32) & 3, [0, 2, 4, 6], dim=3).reshape(R, nb, 64)
        v = f["sc"] + 32
        low = (v[..., :8] & 15) | ((v[..., 8:] & 15) << 4)
        high = bits_in((v >> 4).reshape(R, nb, 4, 4), [0, 2, 4, 6], dim=2)
        return torch.cat([hmask, qs, low.to(torch.uint8), high, f16_bytes(f["d"])], -1)

    def unpack(self, b):
        R, nb, _ = b.shape
        hbit = bits_out(b[..., :32], list(range(8)), 1, dim=2).reshape(R, nb, QK_K)
        low2 = bits_out(b[..., 32:96].reshape(R, nb, 2, 32), [0, 2, 4, 6], 3, dim=3)
        codes = low2.reshape(R, nb, QK_K) | (hbit << 2)
        lo = b[..., 96:104].to(torch.int64)
        v = torch.cat([lo & 15, lo >> 4], -1) | (bits_out(b[..., 104:108], [0, 2, 4, 6], 3,
                                                          dim=2).reshape(R, nb, 16) << 4)
        d = f16_read(b[..., 108:110])
        s = d.unsqueeze(-1) * (v - 32).to(torch.float32)
        return codes, s, torch.zeros_like(s)


class Q6K(_SymK):
    """block_q6_K: ql[128] | qh[64] | scales[16] (int8) | d = 210 bytes; code = level + 32:
    element e = a·128 + r, low nibble in nibble r//64 of ql[a·64 + r%64], top 2 bits at bits
    2·(r//32) of qh[a·32 + r%32]."""

    name, zp, smin, smax = "Q6_K", 32, -128, 127
    levels = _uniform(-32, 31)

    def pack(self, codes, f):
        R, nb, _ = codes.shape
        ql = bits_in((codes & 15).reshape(R, nb, 2, 2, 64), [0, 4], dim=3).reshape(R, nb, 128)
        qh = bits_in((codes >> 4).reshape(R, nb, 2, 4, 32), [0, 2, 4, 6], dim=3).reshape(R, nb, 64)
        sc = f["sc"].to(torch.int8).view(torch.uint8)
        return torch.cat([ql, qh, sc, f16_bytes(f["d"])], -1)

    def unpack(self, b):
        R, nb, _ = b.shape
        low = bits_out(b[..., :128].reshape(R, nb, 2, 64), [0, 4], 15, dim=3)
        high = bits_out(b[..., 128:192].reshape(R, nb, 2, 32), [0, 2, 4, 6], 3, dim=3)
        codes = low.reshape(R, nb, QK_K) | (high.reshape(R, nb, QK_K) << 4)
        sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
        s = f16_read(b[..., 208:210]).unsqueeze(-1) * sc
        return codes, s, torch.zeros_like(s)


KQUANTS: dict[str, Codec] = {c.name: c for c in (Q2K(), Q3K(), Q4K(), Q5K(), Q6K())}
