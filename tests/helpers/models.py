"""Tiny causal LMs for tests: in memory (`tiny_lm`, `tiny_qwen2`, `tiny_gpt2`) or written as a
safetensors checkpoint with a word-level tokenizer (`write_tiny_model`, from bench/tiny.py,
which the benchmarks use too), plus synthetic token batches and a correlated least-squares problem. Same seeds, same shapes, same numbers as before
they lived here."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from bench.tiny import (  # noqa: F401 — re-exported: the tests' builders live there
    FAMILIES,
    VOCAB,
    WORD_VOCAB,
    tiny_config,
    write_tiny_model,
    write_word_tokenizer,
    written_config,
)


def tiny_lm(family: str = "qwen2", seed: int | None = 0, **sizes) -> PreTrainedModel:
    """A randomly initialised model in eval mode (transformers' own init after
    `torch.manual_seed(seed)`; `seed=None` leaves the global RNG alone)."""
    if seed is not None:
        torch.manual_seed(seed)
    _, model_cls = FAMILIES[family]
    return model_cls(tiny_config(family, **sizes)).eval()


def tiny_qwen2(seed: int = 0, tie: bool = False) -> PreTrainedModel:
    return tiny_lm("qwen2", seed, hidden=64, intermediate=72, tie=tie)   # 72: partial groups


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    return tiny_lm("gpt2", seed, hidden=48)


def save_model(model: PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def tokens(n: int = 8, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_problem(m: int, n: int, seed: int = 0, tokens_: int = 2000):
    """W [m, n] and an H = XᵀX/T with correlated, unevenly scaled input features."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n ** 0.5
    mix = torch.eye(n) + 0.2 * torch.randn(n, n, generator=g)
    X = (torch.randn(tokens_, n, generator=g) @ mix) * (0.2 + 3 * torch.rand(n, generator=g))
    return W, X, X.T @ X / tokens_
