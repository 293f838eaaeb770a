"""Tiny random causal LMs written as real checkpoints (safetensors, config, a word-level
tokenizer): what `bitplan bench scale --quick` and the streaming baseline profile, and what the
tests build their models from (tests/helpers/models.py re-exports these)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96   # the in-memory models' vocabulary (tokens() draws from it)

FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
            "gpt2": (GPT2Config, GPT2LMHeadModel)}

def tiny_config(family: str = "qwen2", *, vocab: int = VOCAB, hidden: int = 64,
                intermediate: int = 72, blocks: int = 2, heads: int = 4, kv_heads: int = 2,
                positions: int = 64, tie: bool = False, **extra) -> PretrainedConfig:
    """A small config of one family; `intermediate` and `kv_heads` are ignored for GPT-2
    (4·hidden MLP, no GQA)."""
    config_cls, _ = FAMILIES[family]
    if family == "gpt2":
        return config_cls(vocab_size=vocab, n_embd=hidden, n_layer=blocks, n_head=heads,
                          n_positions=positions, **extra)
    return config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=blocks, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      tie_word_embeddings=tie, **extra)


WORDS = ("def return self import if else for in the None class = ( ) : . , [ ] is not and "
         "or from as with try except raise while True False lambda yield pass").split()
WORD_VOCAB = 264   # the written models' vocabulary: the word tokenizer's ids fit in it


def write_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer (a few dozen Python words, the rest <unk>): no training, and it
    encodes the calibration split ~10x faster than a byte-level one. Enough for a random model."""
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                            pad_token="<|endoftext|>").save_pretrained(path)


def written_config(family: str = "qwen2", hidden: int = 32, blocks: int = 2) -> PretrainedConfig:
    """The config `write_tiny_model` writes (tied head, 128 positions, word-tokenizer vocab)."""
    return tiny_config(family, vocab=WORD_VOCAB, hidden=hidden, intermediate=72, blocks=blocks,
                       positions=128, tie=True)


def write_tiny_model(path: Path, layers: int = 2, seed: int = 0, tokenizer: bool = True,
                     nan_in: str | None = None, family: str = "qwen2", hidden: int = 32) -> Path:
    """A real (random) causal LM in safetensors: config, weights (a few hundred KB) and a
    word-level tokenizer. `nan_in` poisons one linear's weights with a NaN."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(written_config(family, hidden, layers))
    # Re-materialise every parameter on the CPU from our own generator: transformers'
    # from_pretrained patches nn.Module.register_parameter process-wide while it loads, so a
    # model built while a background worker thread loads one can come out on the meta device.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.data = torch.ones(p.shape)
            elif p.dim() == 1:
                p.data = torch.zeros(p.shape)
            else:
                p.data = torch.randn(p.shape, generator=gen) * 0.02
    if nan_in:
        with torch.no_grad():
            dict(model.named_modules())[nan_in].weight[0, 0] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        write_word_tokenizer(path)
    return path
