"""`CompressedLinear`: a drop-in for nn.Linear / GPT-2 Conv1D that computes y = x·(Q + L·R)ᵀ + b
from the packed tensors of a `Decomposed`, and `replace_linear` to swap it into a HF model.

Dequantization is done lazily once and the dense Ŵ cached (non-persistent, rebuilt when the
input's device or dtype changes). Why: the packed form is what the artifact stores and what the
byte budget counts; this module's job is to evaluate that exact Ŵ quickly and identically on CPU
and CUDA. Unpacking per forward would cost O(m·n) bit twiddling per call — as much as the matmul
itself on CPU — for a memory saving that evaluation does not need (the uncompressed model it is
compared against holds the same dense weights). `cache_weight=False` trades that speed back for
memory: Ŵ is then rebuilt on every call and never held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.decompose import Decomposed
from compressor.hessian import is_linear, linear_weight


class CompressedLinear(nn.Module):
    """Holds the packed Q/L/R tensors (buffers "q_packed", "q_scale", "l_zero", …), the kept
    bias (a parameter, at its own dtype) and the decomposition record."""

    def __init__(self, decomposed: Decomposed, bias: Tensor | None = None,
                 cache_weight: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = decomposed.shape
        self.record = decomposed.record()
        self.cache_weight = cache_weight
        self._keys = list(decomposed.tensors())
        self._fp16_keys = set()
        for key, t in decomposed.tensors().items():
            if t.dtype == torch.float16:
                # fp16 scales/zeros are held as their int16 bit patterns, so model.to(dtype)
                # or .half()/.bfloat16() casts leave the stored format (and bytes) untouched.
                self._fp16_keys.add(key)
                t = t.view(torch.int16)
            self.register_buffer(key.replace(".", "_"), t)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self._w: Tensor | None = None

    def decomposed(self) -> Decomposed:
        """The `Decomposed` backed by this module's (current-device) buffers."""
        tensors = {k: getattr(self, k.replace(".", "_")) for k in self._keys}
        tensors = {k: t.view(torch.float16) if k in self._fp16_keys else t
                   for k, t in tensors.items()}
        return Decomposed.from_tensors(tensors, self.record)

    def weight_hat(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense Ŵ [out, in] on the buffers' device."""
        return self.decomposed().w_hat(dtype)

    def _weight_for(self, x: Tensor) -> Tensor:
        w = self._w
        if w is not None and w.device == x.device and w.dtype == x.dtype:
            return w
        w = self.weight_hat(torch.float32).to(device=x.device, dtype=x.dtype)
        self._w = w if self.cache_weight else None
        return w

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.half(): drop the stale cache
        self._w = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight_for(x), bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors (the accounted bytes; biases are kept parameters)."""
        return sum(getattr(self, k.replace(".", "_")).nbytes for k in self._keys)

    def extra_repr(self) -> str:
        opt = self.record["option"]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={opt['bits']}, rank={self.record['rank']}, "
                f"factor_bits={opt['factor_bits']}, group_size={opt['group_size']}, "
                f"bias={self.bias is not None}")


def replace_linear(model: nn.Module, name: str, decomposed: Decomposed,
                   cache_weight: bool = True) -> CompressedLinear:
    """Swap the nn.Linear / Conv1D at module path `name` for a CompressedLinear (same bias
    parameter, tensors moved to the old weight's device). Returns the new module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, CompressedLinear):
        device = old.q_packed.device
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
    new = CompressedLinear(decomposed.to(device), bias, cache_weight=cache_weight)
    setattr(parent, child, new)
    return new
