"""`CompressedLinear`: a drop-in for nn.Linear / GPT-2 Conv1D computing y = x·Ŵᵀ + b with
Ŵ = T_outᵀ·(Q + L·R)·T_in from the packed tensors of a `Decomposed`, and `replace_linear`.

Two runtimes (`Runtime`):
- PACKED (the default): only the stored bytes are resident — the submodules `q`, `l`, `r`
  (`PackedTensor`) hold exactly the buffers the artifact stores, so the linear's resident bytes
  are the plan's `option_bytes`. The forward rotates the activations instead of the weight —
  x' = x·T_inᵀ, z = x'·Qᵀ + (x'·Rᵀ)·Lᵀ, y = z·T_out + b — with the block Hadamard's fast
  Walsh–Hadamard transform (O(n log n) a row, compressor.quant.rounding), dequantizing Q, L and R
  tile by tile inside the matmuls (compressor.runtime.packed; the fused Triton kernel on CUDA). L·R is
  never formed. Same math as Ŵ since T is orthogonal: x·Ŵᵀ = (x·T_inᵀ)·(Q + LR)ᵀ·T_out.
- DENSE: Ŵ is dequantized once and cached (non-persistent, rebuilt when the input's device or
  dtype changes) — fast repeated evaluation at the cost of m·n dense values; an explicit
  option (evaluation), never the default.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.quant.decomposed import Decomposed
from compressor.quant.hessian import is_linear, linear_weight
from compressor.quant.rounding import BlockHadamard
from compressor.runtime.packed import PackedSpec, dequantize_tiles, packed_matmul
from solver.bytes import FP16_BITS, Option

PARTS = ("q", "l", "r")


class Runtime(StrEnum):
    PACKED = "packed"   # stored bytes only; dequantize per tile inside the matmul
    DENSE = "dense"     # cache the dense Ŵ (evaluation speed; m·n values resident)


class PackedTensor(nn.Module):
    """One stored quantized tensor as buffers "packed" (uint8), "scale" and "zero" (fp16 held
    as int16 bit patterns, so model.to(dtype)/.half() leave the stored format and bytes alone).
    Empty tensors (rank 0, 16-bit scales) are not registered: they hold no bytes."""

    def __init__(self, spec: PackedSpec, tensors: dict[str, Tensor] | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        shapes = {"packed": ((self._packed_bytes(spec),), torch.uint8)}
        if spec.bits != FP16_BITS and spec.rows * spec.cols:
            shapes["scale"] = ((spec.rows, spec.n_groups), torch.int16)
            if not spec.symmetric:
                shapes["zero"] = ((spec.rows, spec.n_groups), torch.int16)
        for key, (shape, dtype) in shapes.items():
            if not shape[0]:
                continue
            t = (tensors or {}).get(key)
            if t is None:
                t = torch.empty(shape, dtype=dtype, device=device)
            elif t.dtype == torch.float16:
                t = t.view(torch.int16)
            self.register_buffer(key, t.reshape(shape).to(device) if device else t.reshape(shape))

    @staticmethod
    def _packed_bytes(spec: PackedSpec) -> int:
        n = spec.rows * spec.cols
        return 2 * n if spec.bits == FP16_BITS else -(-n * spec.bits // 8)

    def fp16(self, key: str) -> Tensor | None:
        t = getattr(self, key, None)
        return None if t is None else t.view(torch.float16)

    def stored(self) -> dict[str, Tensor]:
        """The tensors as the artifact stores them (scales/zeros back as fp16)."""
        out = {k: getattr(self, k) for k in ("packed", "scale", "zero") if hasattr(self, k)}
        return {k: (v if k == "packed" else v.view(torch.float16)) for k, v in out.items()}

    def dense(self) -> Tensor:
        """The whole tensor dense in float32 (rows·cols values)."""
        spec = self.spec
        if not spec.rows * spec.cols:
            return torch.zeros(spec.rows, spec.cols)
        tiles = torch.arange(-(-spec.rows // 8), device=self.packed.device)
        return dequantize_tiles(self.packed, self.fp16("scale"), self.fp16("zero"), spec,
                                tiles)[:spec.rows]

    def matmul(self, x: Tensor) -> Tensor:
        """x [T, cols] · Ŵᵀ → [T, rows] float32, never holding Ŵ dense."""
        if not self.spec.rows * self.spec.cols:
            return x.new_zeros(x.shape[0], self.spec.rows, dtype=torch.float32)
        return packed_matmul(x, self.packed, self.fp16("scale"), self.fp16("zero"), self.spec)


def _specs(record: dict) -> dict[str, PackedSpec]:
    m, n = record["shape"]
    r = record["rank"]
    opt = Option.from_dict(record["option"])
    gs, sym = opt.group_size, opt.symmetric
    return {"q": PackedSpec(m, n, opt.bits, gs, sym),
            "l": PackedSpec(m, r, opt.factor_bits, gs, sym),
            "r": PackedSpec(r, n, opt.factor_bits, gs, sym)}


class CompressedLinear(nn.Module):
    """Holds the packed Q/L/R tensors (submodules q, l, r), the kept bias (a parameter, at its
    own dtype) and the decomposition record (shape, rank, option, config)."""

    def __init__(self, decomposed: Decomposed | None = None, bias: Tensor | None = None,
                 runtime: Runtime = Runtime.PACKED, *, record: dict | None = None,
                 has_bias: bool | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """From a `Decomposed` (its tensors become the buffers), or from a `record` alone with
        uninitialised buffers on `device` (how from_pretrained builds the skeleton; `has_bias`
        then makes an empty bias of `dtype`)."""
        super().__init__()
        if decomposed is not None:
            record = decomposed.record()
            tensors = decomposed.tensors()
        elif record is None:
            raise ValueError("CompressedLinear needs a Decomposed or a record")
        else:
            tensors = {}
        self.record = record
        self.out_features, self.in_features = record["shape"]
        self.runtime = Runtime(runtime)
        for part, spec in _specs(record).items():
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(part + ".")}
            self.add_module(part, PackedTensor(spec, own, device))
        if bias is None and has_bias:
            bias = torch.empty(self.out_features, device=device, dtype=dtype)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self._w: Tensor | None = None
        self._rot: tuple[BlockHadamard, BlockHadamard] | None = None

    @property
    def hadamard(self) -> bool:
        return bool(self.record["config"].get("hadamard", False))

    @property
    def rank(self) -> int:
        return int(self.record["rank"])

    def decomposed(self) -> Decomposed:
        """The `Decomposed` backed by this module's (current-device) buffers."""
        tensors = {f"{p}.{k}": v for p in PARTS for k, v in getattr(self, p).stored().items()}
        return Decomposed.from_tensors(tensors, self.record)

    def weight_hat(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense Ŵ [out, in] on the buffers' device (materialises m·n values)."""
        return self.decomposed().w_hat(dtype)

    def _rotations(self, device: torch.device) -> tuple[BlockHadamard, BlockHadamard]:
        # the signs are regenerated from the seed (no bytes stored); cached per device:
        # (m + n) floats beside the packed bytes
        rot = self._rot
        if rot is None or rot[0].signs.device != device:
            seed = int(self.record["config"].get("seed", 0))
            rot = (BlockHadamard(self.out_features, seed, device),
                   BlockHadamard(self.in_features, seed + 1, device))
            self._rot = rot
        return rot

    def _dense_weight(self, x: Tensor) -> Tensor:
        w = self._w
        if w is None or w.device != x.device or w.dtype != x.dtype:
            w = self.weight_hat(torch.float32).to(device=x.device, dtype=x.dtype)
            self._w = w
        return w

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.half(): drop stale caches
        self._w = None
        self._rot = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.runtime is Runtime.DENSE:
            return F.linear(x, self._dense_weight(x), bias)
        lead = x.shape[:-1]
        # the rotation runs in fp32 (cheap next to the matmul); the CUDA kernel multiplies in
        # x's own dtype, the CPU path in fp32
        h = x.reshape(-1, self.in_features)
        work = h if h.is_cuda else h.float()
        rot = self._rotations(x.device) if self.hadamard else None
        if rot is not None:
            work = rot[1].apply(work.float()).to(work.dtype)
        z = self.q.matmul(work)
        if self.rank:
            z += self.l.matmul(self.r.matmul(work).to(work.dtype))
        if rot is not None:
            z = rot[0].invert(z)
        y = z.to(x.dtype).reshape(*lead, self.out_features)
        return y if bias is None else y + bias

    @property
    def nbytes(self) -> int:
        """Bytes of the packed buffers (the accounted bytes; biases are kept parameters)."""
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        opt = self.record["option"]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={opt['bits']}, rank={self.rank}, factor_bits={opt['factor_bits']}, "
                f"group_size={opt['group_size']}, bias={self.bias is not None}, "
                f"runtime={self.runtime.value}")


class CompressedEmbedding(nn.Module):
    """A token embedding stored as one packed [vocab, D] tensor (Q alone, unrotated: a lookup
    reads rows, so no rotation may mix them; compressor.pipeline.vocab). PACKED dequantizes only
    the 8-row tiles holding the ids a forward reads; DENSE caches Ŵ. A tied head is a
    `CompressedLinear` whose `q` is this module's (`tie_head`): one tensor, stored once."""

    def __init__(self, decomposed: Decomposed | None = None, runtime: Runtime = Runtime.PACKED,
                 *, record: dict | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if decomposed is not None:
            record, tensors = decomposed.record(), decomposed.tensors()
        elif record is None:
            raise ValueError("CompressedEmbedding needs a Decomposed or a record")
        else:
            tensors = {}
        if record["rank"] or record["config"].get("hadamard"):
            raise ValueError("an embedding is stored as Q alone, unrotated")
        self.record = record
        self.num_embeddings, self.embedding_dim = record["shape"]
        self.runtime = Runtime(runtime)
        own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("q.")}
        self.q = PackedTensor(_specs(record)["q"], own, device)
        # follows model.to(dtype): the dtype lookups come out in (no bytes, not saved)
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype, device=None if str(
            device) == "meta" else device), persistent=False)   # never meta: holds no data
        self._w: Tensor | None = None

    def weight_hat(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.q.dense().to(dtype)

    def forward(self, ids: Tensor) -> Tensor:
        if self.runtime is Runtime.DENSE:
            dtype = self._dtype.dtype   # cached in the model's dtype (fp16: half of fp32)
            if self._w is None or self._w.device != ids.device or self._w.dtype != dtype:
                self._w = self.weight_hat().to(ids.device, dtype)
            return self._w[ids]
        q = self.q
        uniq, inverse = torch.unique(ids, return_inverse=True)
        tiles, in_tile = torch.unique(uniq // 8, return_inverse=True)
        rows = dequantize_tiles(q.packed, q.fp16("scale"), q.fp16("zero"), q.spec, tiles)
        return rows[in_tile * 8 + uniq % 8][inverse].to(self._dtype.dtype)

    def _apply(self, fn, recurse: bool = True):
        self._w = None
        return super()._apply(fn, recurse)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.q.buffers())

    def tie_head(self, head: CompressedLinear) -> CompressedLinear:
        """`head` reading this module's packed tensor (the tied LM head)."""
        head.q = self.q
        return head

    def extra_repr(self) -> str:
        opt = self.record["option"]
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={opt['bits']}, "
                f"group_size={opt['group_size']}, runtime={self.runtime.value}")


def set_runtime(model: nn.Module, runtime: Runtime) -> int:
    """Switch every CompressedLinear and CompressedEmbedding of `model` to `runtime` (dropping
    dense caches when leaving DENSE); returns how many were switched."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, CompressedLinear | CompressedEmbedding):
            mod.runtime = Runtime(runtime)
            mod._w = None
            n += 1
    return n


def replace_linear(model: nn.Module, name: str, decomposed: Decomposed,
                   runtime: Runtime = Runtime.PACKED) -> CompressedLinear:
    """Swap the nn.Linear / Conv1D at module path `name` for a CompressedLinear (same bias
    parameter, tensors moved to the old weight's device). Returns the new module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, CompressedLinear):
        device = old.q.packed.device
        bias = old.bias
    else:
        if not is_linear(old):
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear/Conv1D")
        w = linear_weight(old)
        if tuple(w.shape) != tuple(decomposed.shape):
            raise ValueError(f"{name}: weight is {tuple(w.shape)}, decomposition is "
                             f"{tuple(decomposed.shape)}")
        device = w.device
        bias = old.bias
    new = CompressedLinear(decomposed.to(device), bias, runtime=runtime)
    setattr(parent, child, new)
    return new


def replace_vocab(model: nn.Module, name: str, kind: str, decomposed: Decomposed,
                  runtime: Runtime = Runtime.PACKED) -> nn.Module:
    """Swap a vocabulary item (headers.VOCAB_KINDS) for its compressed form: a "head" is a
    linear; an "embedding" becomes a CompressedEmbedding; a "tied" one also makes the model's
    output head a CompressedLinear reading the same packed tensor. Returns the new module."""
    if kind == "head":
        return replace_linear(model, name, decomposed, runtime)
    old = model.get_submodule(name)
    emb = CompressedEmbedding(decomposed.to(old.weight.device), runtime,
                              dtype=old.weight.dtype)
    if kind == "tied":
        head = model.get_output_embeddings()
        head_name = next(n for n, m in model.named_modules() if m is head)
        set_module(model, head_name, emb.tie_head(
            CompressedLinear(record=emb.record, device="meta", runtime=runtime)))
    set_module(model, name, emb)
    return emb


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
