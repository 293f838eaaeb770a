"""A tiny Llama-architecture GGUF file written from scratch with the `gguf` package (gguf-py,
llama.cpp's reader/writer): what the GGUF import tests and `bitplan bench real --quick` read.

The file is laid out the way llama.cpp's convert_hf_to_gguf.py lays out a Llama model: tensor
names `token_embd`, `blk.N.attn_q` …, `output_norm`, `output` (absent when tied); q and k rows
permuted into llama.cpp's rotary order (transformers undoes it on load); a GPT-2-style
byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`, tokens, token types, merges, the
special ids), as in SmolLM2's GGUF. The vocabulary is a byte-level BPE trained here on a few
sentences (the 256 byte symbols, three ChatML-style specials, a few dozen merges), so text
round-trips through the tokenizer transformers builds from it. Torch-free (numpy, gguf,
tokenizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, BLOCKS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 64, 2, 4, 2, 128, 128
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # unk, bos, eos (as in SmolLM2)
CORPUS = ("The quick brown fox jumps over the lazy dog. A tiny model reads the text, and the "
          "planner decides how many bits each layer gets. Hello world, it's a test of the "
          "tokenizer: numbers 0123456789 and punctuation! ")
MERGES_WANTED = 64
FLOAT_TYPES = ("F32", "F16")
QUANT_TYPES = ("Q8_0", "Q4_0")


def tiny_tokenizer() -> tuple[list[str], list[str]]:
    """(tokens by id, merges as "a b") of a byte-level BPE trained on CORPUS: the specials
    first, then the 256 byte symbols, then one token per merge."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIALS) + len(alphabet) + MERGES_WANTED,
                                  special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def tiny_llama_weights(vocab: int, *, tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under their Hugging Face Llama names (q/k in HF order)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((vocab, HIDDEN)))
         .astype(np.float32)}
    for i in range(BLOCKS):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": mat(HEADS * head_dim, HIDDEN),
              p + "self_attn.k_proj.weight": mat(KV_HEADS * head_dim, HIDDEN),
              p + "self_attn.v_proj.weight": mat(KV_HEADS * head_dim, HIDDEN),
              p + "self_attn.o_proj.weight": mat(HIDDEN, HEADS * head_dim),
              p + "post_attention_layernorm.weight": norm(),
              p + "mlp.gate_proj.weight": mat(INTERMEDIATE, HIDDEN),
              p + "mlp.up_proj.weight": mat(INTERMEDIATE, HIDDEN),
              p + "mlp.down_proj.weight": mat(HIDDEN, INTERMEDIATE)}
    w["model.norm.weight"] = norm()
    if not tied:
        w["lm_head.weight"] = mat(vocab, HIDDEN)
    return w


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows → llama.cpp's rotary order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """A Hugging Face Llama parameter name → its GGUF tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, block, rest = hf_name.split(".", 3)
    return f"blk.{block}.{_BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


def write_tiny_llama_gguf(path: str | Path, *, tied: bool = True, quant: str | None = "Q8_0",
                          floats: str = "F32", architecture: str = "llama",
                          seed: int = 0) -> Path:
    """Write the tiny model to `path` and return it. Norms are F32 (as llama.cpp stores them);
    the embedding (and the untied head) are `floats` (F32 or F16); the block linears are
    `quant` (Q8_0 or Q4_0; None: `floats` too). `architecture` is written as
    general.architecture (and prefixes the model keys), so a test can name one transformers
    does not know."""
    import gguf

    if floats not in FLOAT_TYPES or (quant is not None and quant not in QUANT_TYPES):
        raise ValueError(f"floats must be one of {FLOAT_TYPES}, quant one of {QUANT_TYPES} "
                         f"or None; got {floats!r}, {quant!r}")
    path = Path(path)
    tokens, merges = tiny_tokenizer()
    weights = tiny_llama_weights(len(tokens), tied=tied, seed=seed)
    qt = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("bitplan tiny llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    file_type = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 None: gguf.LlamaFileType.ALL_F32 if floats == "F32"
                 else gguf.LlamaFileType.MOSTLY_F16}[quant]
    writer.add_file_type(int(file_type))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL)
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)

    for hf_name, w in weights.items():
        if ".q_proj." in hf_name:
            w = _permute(w, HEADS)
        elif ".k_proj." in hf_name:
            w = _permute(w, KV_HEADS)
        kind = "F32" if w.ndim == 1 else floats
        if w.ndim == 2 and ".layers." in hf_name and quant is not None:
            kind = quant
        if kind == "F32":
            writer.add_tensor(gguf_name(hf_name), w)
        elif kind == "F16":
            writer.add_tensor(gguf_name(hf_name), w.astype(np.float16))
        else:
            data = gguf.quants.quantize(w, qt[kind])
            writer.add_tensor(gguf_name(hf_name), data, raw_shape=data.shape, raw_dtype=qt[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
