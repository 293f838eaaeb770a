"""What a profile's target changes in profiling: which linears are planned, how one is sampled
and what the fixed bytes count. The targets (solver.bytes.TARGETS): "native" (CALDERA, our
runtime), "gguf" (llama.cpp types: gguf_target.py) and "compressed-tensors" (vLLM schemes:
ct_target.py)."""

from __future__ import annotations

import math

from compressor.checkpoint.loading import Inventory
from solver.bytes import TARGETS
from solver.ct_schemes import CT_TARGET


def check_target(target: str, tied: str = "head") -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if tied not in ("head", "lookup"):   # how a GGUF profile rounds a tied tensor (vocab.py)
        raise ValueError(f"gguf_tied must be head or lookup, got {tied!r}")
    return target


def check_target_model(inv: Inventory, target: str) -> None:
    """Refuse, before any work, a model the target cannot serve: compressed-tensors quantizes
    nn.Linear modules (GPT-2's Conv1D weights are stored transposed: not supported)."""
    if target == CT_TARGET:
        odd = [li.name for li in inv.linears if not li.is_vocab and li.kind != "linear"]
        if odd:
            raise ValueError(f"target {CT_TARGET} quantizes nn.Linear modules; {odd[0]} is a "
                             f"{next(li.kind for li in inv.linears if li.name == odd[0])} "
                             f"({len(odd)} such): use --target native or gguf")


def plans_vocab(target: str) -> bool:
    """Whether the embedding and head are planned (vLLM serves compressed-tensors ones dense)."""
    return target != CT_TARGET


def planned_linears(inv: Inventory, target: str) -> list:
    """The inventory's linears a plan for `target` assigns options to."""
    return [li for li in inv.linears if plans_vocab(target) or not li.is_vocab]


def fixed_bytes(inv: Inventory, target: str) -> int:
    """Bytes of what a plan keeps as it is: the kept tensors at their stored dtype in our
    artifact; in a GGUF, F32, as llama.cpp's converter writes every 1-D tensor (norms,
    biases); in a compressed-tensors export, fp16 (its dtype), the embedding and head too."""
    if target == "gguf":
        return 4 * sum(math.prod(k.shape) for k in inv.kept)
    if target == CT_TARGET:
        return 2 * (sum(math.prod(k.shape) for k in inv.kept)
                    + sum(li.numel for li in inv.linears if li.is_vocab))
    return inv.kept_bytes
