"""Compression on the bundled demo model (12-layer Qwen2): real weights, real activations."""

from __future__ import annotations

import pytest
import torch

from compressor.artifact.in_memory import save_artifact
from compressor.artifact.native import load_compressed
from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.loading import discover, load_model, load_tokenizer
from compressor.pipeline.compress import compress_model
from compressor.pipeline.evaluate import eval_sequences, evaluate, reference_logprobs
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import collect_hessians, linear_weight
from solver.bytes import Option, option_bytes

LAYER = "model.layers.6.mlp.down_proj"   # [192, 520]: 520 = 4·128 + 8, a partial group


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this module runs (set at import, it held for every later test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(demo_model_path):
    model = load_model(demo_model_path)
    tok = load_tokenizer(demo_model_path)
    calib = token_sequences(tok, Split.TRAIN, 256, n_seqs=16, seed=0)
    return model, tok, calib


@pytest.fixture(scope="module")
def layer(demo):
    model, _, calib = demo
    H = collect_hessians(model, calib, [LAYER])[LAYER]
    W = linear_weight(dict(model.named_modules())[LAYER]).detach().float()
    return W, H


def test_error_non_increasing_in_rank_and_bits(layer) -> None:
    W, H = layer
    cfg = DecompositionConfig()
    by_rank = [decompose(W, H, Option(3, r, 4), cfg).rel_h_err for r in (0, 8, 32, 96, 192)]
    assert all(b <= a for a, b in zip(by_rank, by_rank[1:], strict=False)), by_rank
    assert by_rank[-1] < 0.5 * by_rank[0]
    by_bits = [decompose(W, H, Option(b, 16, 4), cfg).rel_h_err for b in (2, 3, 4, 5, 8)]
    assert all(b < a for a, b in zip(by_bits, by_bits[1:], strict=False)), by_bits
    full = decompose(W, H, Option(2, 192, 8), cfg)
    assert full.rel_h_err < 0.01 and full.nbytes == option_bytes(192, 520, Option(2, 192, 8))


def test_uniform_4bit_within_5_percent_ppl(demo, tmp_path) -> None:
    model, tok, calib = demo
    seqs = eval_sequences(tok, 256, 32)
    ref = reference_logprobs(model, seqs)
    base = evaluate(model, seqs)
    work = load_model(model.name_or_path)
    assign = {li.name: Option(4, 0) for li in discover(work).linears}
    decs = compress_model(work, assign, calib, DecompositionConfig())
    q4 = evaluate(work, seqs, reference=ref)
    assert q4.ppl <= 1.05 * base.ppl, (base.ppl, q4.ppl)
    assert q4.top1 > 0.85
    # the artifact of the same model reloads to identical outputs with exact bytes
    manifest = save_artifact(work, tok, decs, tmp_path / "q4", source_ref=model.name_or_path)
    assert manifest.compressed_bytes == sum(option_bytes(*d.shape, d.option)
                                            for d in decs.values())
    assert manifest.source_sha256 is not None
    loaded, tok2 = load_compressed(tmp_path / "q4")
    again = evaluate(loaded, seqs[:8])
    assert again.ppl == pytest.approx(evaluate(work, seqs[:8]).ppl, rel=1e-5)
    assert tok2 is not None and len(tok2) == len(tok)
