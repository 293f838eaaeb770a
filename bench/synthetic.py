"""Synthetic checkpoints at real widths for the scale benchmark and the GPU check: a Llama/Qwen2
config, sharded fp16 safetensors written shard by shard (bounded memory), and the demo model's
tokenizer (its ids, < 4096, fit any vocabulary of these shapes).

Weights are N(0, 0.02) with a few outlier input columns (×8 on 1 % of the columns of every
linear), norms 1: untrained, but with the spread and outliers that make quantization non-trivial.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.settings import DEMO_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Shape:
    family: str          # "llama" or "qwen2"
    blocks: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self, j: int) -> dict[str, tuple[int, ...]]:
        p, h, kv = f"model.layers.{j}.", self.hidden, self.kv_heads * self.head_dim
        out = {f"{p}self_attn.q_proj.weight": (h, h), f"{p}self_attn.k_proj.weight": (kv, h),
               f"{p}self_attn.v_proj.weight": (kv, h), f"{p}self_attn.o_proj.weight": (h, h),
               f"{p}mlp.gate_proj.weight": (self.intermediate, h),
               f"{p}mlp.up_proj.weight": (self.intermediate, h),
               f"{p}mlp.down_proj.weight": (h, self.intermediate),
               f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)}
        if self.family == "qwen2":   # Qwen2 has q/k/v biases
            out |= {f"{p}self_attn.q_proj.bias": (h,), f"{p}self_attn.k_proj.bias": (kv,),
                    f"{p}self_attn.v_proj.bias": (kv,)}
        return out

    def other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {"model.embed_tokens.weight": (self.vocab, self.hidden),
                "model.norm.weight": (self.hidden,),
                "lm_head.weight": (self.vocab, self.hidden)}

    def params(self) -> int:
        shapes = [*self.other_tensors().values()]
        for j in range(self.blocks):
            shapes += self.block_tensors(j).values()
        return sum(torch.Size(s).numel() for s in shapes)

    def config(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.family]
        return {"architectures": [arch], "model_type": self.family, "dtype": "float16",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "num_hidden_layers": self.blocks, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
                "eos_token_id": 0}


TINYLLAMA = Shape("llama", 22, 2048, 5632, 32, 4, 32000)
QWEN2_1_5B = Shape("qwen2", 28, 1536, 8960, 12, 2, 151936)
QUICK = Shape("llama", 4, 256, 688, 4, 2, 4096)   # the smoke-sized runs' model


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith(".bias"):
        return (torch.randn(shape, generator=gen) * 0.02).half()
    w = torch.randn(shape, generator=gen) * 0.02
    if "layers" in name:   # a few outlier input columns, as trained LLMs have
        cols = torch.randperm(shape[1], generator=gen)[: max(1, shape[1] // 100)]
        w[:, cols] *= 8
    return w.half()


def write_checkpoint(path: Path, shape: Shape, shard_bytes: int = 1 << 29, seed: int = 0) -> Path:
    """config.json, model-0000k-of-n.safetensors + index, tokenizer; returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    order = [shape.other_tensors()] + [shape.block_tensors(j) for j in range(shape.blocks)]
    for tensors in order:
        for name, s in tensors.items():
            if sum(torch.Size(x).numel() * 2 for x in groups[-1].values()) >= shard_bytes:
                groups.append({})
            groups[-1][name] = s
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _tensor(n, s, gen) for n, s in group.items()}, path / fname,
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, fname)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * shape.params()}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(shape.config(), indent=1))
    for f in TOKENIZER_FILES:
        if (DEMO_MODEL / f).is_file():
            shutil.copy(DEMO_MODEL / f, path / f)
    return path
