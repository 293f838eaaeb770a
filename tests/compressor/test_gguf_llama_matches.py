"""What llama.cpp runs is what bitplan measured: a GGUF plan on the tiny Llama (bench/
tiny_llama.py), written by execute_gguf, run by llama-perplexity, whose saved log-probabilities
(its --kl-divergence-base file: the tokens, then per scored position a uint16-coded log-softmax)
are compared with our own forward pass of the decoded weights on the very same tokens. The two
agree far more closely than either agrees with the original model — so the bytes, the tensor
names, the row permutations and the metadata all reach llama.cpp as bitplan meant them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import llama_cpp
from bench.tiny_llama import write_tiny_llama
from compressor import api
from compressor.artifact.gguf_export import tensor_plan
from compressor.checkpoint.data import Split, load_text
from compressor.pipeline.execute import ExecuteConfig
from compressor.pipeline.gguf_execute import MODEL_FILE, REFERENCE_FILE, GGUFWeights, execute_gguf
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from tests.helpers.llama_cpp import llama_cpp_bin

pytestmark = pytest.mark.slow
CTX, CHUNKS = 64, 6


def read_logits(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [chunks, ctx], log-probs [chunks, positions, vocab], first scored position) of
    a llama-perplexity --kl-divergence-base file (perplexity.cpp: b"_logits_", u32 n_ctx,
    i32 n_vocab, i32 n_chunk, int32 tokens, then per position 2 floats (scale, min log-prob)
    and n_vocab uint16 codes, padded to an even count; code 0 = at or below the min)."""
    raw = path.read_bytes()
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw[8:20])
    tokens = np.frombuffer(raw, np.int32, n_ctx * n_chunk, 20).reshape(n_chunk, n_ctx)
    first = n_ctx // 2
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_pos = n_ctx - 1 - first
    u16 = np.frombuffer(raw, np.uint16, n_chunk * n_pos * nv, 20 + 4 * tokens.size)
    u16 = u16.reshape(n_chunk, n_pos, nv)
    head = u16[..., :4].copy().view(np.float32)              # [chunks, positions, 2]
    codes = u16[..., 4:4 + n_vocab].astype(np.float32)
    logp = head[..., 1:2] + head[..., 0:1] * codes
    return tokens, np.where(codes > 0, logp, -np.inf), first


def _torch_logprobs(model_dir: Path, tokens: np.ndarray, weights=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, w in (weights or {}).items():
        model.get_submodule(name).weight.data.copy_(w)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.from_numpy(tokens.copy()).long()).logits, -1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    llama_cpp_bin()
    tmp = tmp_path_factory.mktemp("gguf-match")
    model = write_tiny_llama(tmp / "tiny")
    # a peaked head: random weights give near-uniform next-token distributions, where every
    # KL is tiny; a larger head makes the quantization's damage (and any mismatch) visible
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model)
    m.lm_head.weight.data.mul_(12)
    m.save_pretrained(model)
    cfg = ProfileConfig(target="gguf", calib_seqs=8, fisher_seqs=4, seq_len=128)
    prof = run_profile(str(model), FileProfileStore(tmp / "profiles"), config=cfg)
    plan = api.plan(prof, "3.2bpp")
    done = execute_gguf(str(model), prof, plan, tmp / "out",
                        ExecuteConfig(eval_seqs=2, eval_seq_len=64))
    text = tmp / "text.txt"
    text.write_text(load_text(Split.TEST)[:40_000])
    llama_cpp.kld_base(done.artifact, text, tmp / "ours.kld", ctx=CTX, chunks=CHUNKS)
    tokens, llama_logp, first = read_logits(tmp / "ours.kld")
    names = tensor_plan(model, done.artifact.parent / REFERENCE_FILE, list(plan.assignments))
    weights = GGUFWeights(done.artifact.parent / MODEL_FILE, names)
    ours = _torch_logprobs(model, tokens, {n: weights[n] for n in plan.assignments})
    orig = _torch_logprobs(model, tokens)
    return {"plan": plan, "tokens": tokens, "llama": torch.from_numpy(llama_logp),
            "ours": ours[:, first:-1], "orig": orig[:, first:-1]}


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean KL(p ‖ q) over positions; p's coded log-probs below its floor count as 0 mass."""
    p = p_log.exp()
    return float(torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1).mean())


def test_llama_cpp_runs_our_gguf_as_we_measured_it(run):
    assert {o.gguf_type for o in run["plan"].assignments.values()} - {"Q8_0", "F16"}, \
        "the plan should quantize something below 8 bits"
    damage = _kl(run["orig"], run["ours"])        # what the plan costs, in our forward pass
    mismatch = _kl(run["llama"], run["ours"])     # llama.cpp's pass vs ours, same weights
    assert damage > 1e-3
    assert mismatch < 0.01 * damage, (mismatch, damage)   # measured: 0.0017x
    agree = (run["llama"].argmax(-1) == run["ours"].argmax(-1)).float().mean().item()
    assert agree > 0.97
