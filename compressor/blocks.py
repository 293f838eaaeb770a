"""Run a decoder model block by block from cached block inputs.

Sensitivity probing perturbs one linear at a time; re-running the whole model for each probe
wastes the blocks before it. We capture, once, the hidden state entering every block and the
keyword arguments the model passes to its blocks (masks, rotary embeddings), then replay only
blocks b..L-1 plus the final norm and head. Works for HF decoders whose blocks live in one
ModuleList (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


@dataclass
class BlockCache:
    """Inputs of every block for a batch of sequences, plus reference log-probs."""

    inputs: list[torch.Tensor]          # per block: hidden state entering it [B, T, D]
    output: torch.Tensor                # hidden state leaving the last block
    kwargs: dict                        # what the model passes to each block (masks, rope)
    ref_logp: torch.Tensor              # reference log-probs [B, T, V]


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor) -> BlockCache:
    blocks = block_list(model)
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}
    out: list[torch.Tensor] = []

    def pre_hook(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def last_hook(module, args, output):
        out.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(last_hook))
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("layer_past", None)
    return BlockCache(inputs, out[0], kwargs, F.log_softmax(logits.float(), -1))


@torch.no_grad()
def run_from(model: nn.Module, cache: BlockCache, start: int) -> torch.Tensor:
    """Log-probs of the model when the hidden state is replayed from block `start` onwards."""
    blocks = block_list(model)
    h = cache.inputs[start]
    for blk in blocks[start:]:
        res = blk(h, **cache.kwargs)
        h = res[0] if isinstance(res, tuple) else res
    logits = model.get_output_embeddings()(final_norm(model)(h))
    return F.log_softmax(logits.float(), -1)


def kl_to_ref(logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ model)."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


def block_influence(cache: BlockCache) -> list[float]:
    """ShortGPT's Block Influence (Men et al. 2024, §3.1): 1 − mean cos(h_in, h_out) per block."""
    outs = cache.inputs[1:] + [cache.output]
    return [(1 - F.cosine_similarity(i.float(), o.float(), dim=-1)).mean().item()
            for i, o in zip(cache.inputs, outs, strict=True)]
