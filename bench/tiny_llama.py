"""A tiny Hugging Face Llama that llama.cpp's converter accepts offline: random bf16 weights and
a SentencePiece BPE tokenizer trained here on the repository's own corpus (the converter's
SentencePiece path identifies no pre-tokenizer by hash, as its GPT-2 path does, so a tokenizer
made here is taken). Rows of 256 and 512 elements, so every GGUF type fits somewhere: the
k-quants (256-element super-blocks) as well as the 32-element types. What `bitplan bench gguf
--quick` and the GGUF target's tests run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

HIDDEN, INTERMEDIATE, BLOCKS, HEADS, KV_HEADS, VOCAB, CONTEXT = 256, 512, 2, 4, 2, 512, 256


def bench_model(env: str, quick: bool, tmp: Path, *, tied: bool = False
                ) -> tuple[Path | None, str]:
    """(model directory, where it came from) for a bench over real models: the directory `env`
    names, else (quick) a tiny Llama written into `tmp`, else SmolLM2 (`make smollm2`); None
    and the reason, in words, when there is none."""
    import os

    from service.settings import REPO_ROOT

    smollm2 = REPO_ROOT / "models" / "smollm2-135m"
    given = os.environ.get(env)
    if given:
        return (Path(given), given) if (Path(given) / "config.json").is_file() else \
            (None, f"{env}={given} is not a model directory (no config.json)")
    if quick:
        return write_tiny_llama(tmp / "tiny", tied=tied), "bench/tiny_llama.py, written in this run"
    if (smollm2 / "config.json").is_file():
        return smollm2, str(smollm2)
    return None, f"no model at {smollm2}: run `make smollm2` first (~1 min)"


def write_tiny_llama(out: Path, *, seed: int = 0, tied: bool = False,
                     intermediate: int = INTERMEDIATE) -> Path:
    """The model directory `out` (config, safetensors, tokenizer.model, tokenizer_config);
    `tied`: the head shares the embedding (as SmolLM2's does); `intermediate`: the MLP width
    (e.g. one no 32-group divides, as the demo model's 520)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.checkpoint.data import Split, load_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in load_text(Split.TRAIN)[:400_000].splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=intermediate,
                      num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False}))
    return out
