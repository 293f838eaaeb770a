"""Tiny randomly initialised HF models and synthetic calibration data for compressor tests."""

from __future__ import annotations

import torch

VOCAB = 96


def tiny_qwen2(seed: int = 0, tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=72,  # 72: partial groups
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tokens(n: int = 8, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_problem(m: int, n: int, seed: int = 0, tokens_: int = 2000):
    """W [m, n] and an H = XᵀX/T with correlated, unevenly scaled input features."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n ** 0.5
    mix = torch.eye(n) + 0.2 * torch.randn(n, n, generator=g)
    X = (torch.randn(tokens_, n, generator=g) @ mix) * (0.2 + 3 * torch.rand(n, generator=g))
    return W, X, X.T @ X / tokens_
