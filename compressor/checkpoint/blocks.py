"""Where a decoder's blocks and final norm live: HF decoders keep their blocks in one
ModuleList (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`, OPT, GPT-NeoX)."""

from __future__ import annotations

from torch import nn

_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def block_list(model: nn.Module) -> nn.ModuleList:
    for attr in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        mod: nn.Module | None = model
        for part in attr.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in _FINAL_NORMS:
        if base is not None and hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")
