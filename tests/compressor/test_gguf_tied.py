"""A GGUF profile rounds a tied embedding as the head it also is (compressor/pipeline/vocab.py):
its error samples are the encoders' t² under the head's Hessian — the normed final hidden
states of the calibration, recomputed here with transformers — not the lookup's Frobenius
error, and the tied tensor is encoded with error feedback under that Hessian, which lowers the
head-weighted error below a lookup's rounding of the same type."""

from __future__ import annotations

import pytest
import torch

from bench.tiny_llama import write_tiny_llama
from compressor.checkpoint.loading import load_tokenizer
from compressor.pipeline.gguf_target import encode_for_plan, relative_error
from compressor.pipeline.profile import ProfileConfig, calibration, run_profile
from compressor.pipeline.profile_store import FileProfileStore

pytestmark = pytest.mark.slow
CFG = ProfileConfig(target="gguf", calib_seqs=4, fisher_seqs=2, seq_len=64,
                    gguf_types=("Q8_0", "Q4_0", "Q4_K", "Q2_K"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = write_tiny_llama(tmp_path_factory.mktemp("tied") / "tiny", tied=True)
    prof = run_profile(str(model), FileProfileStore(model.parent / "profiles"), config=CFG)
    return model, prof


def _head_hessian(model, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = calibration(load_tokenizer(str(model)), cfg)
    with torch.no_grad():
        x = m.model(input_ids=ids).last_hidden_state.reshape(-1, m.config.hidden_size)
    return m.model.embed_tokens.weight.detach().float(), x.double().T @ x.double() / len(x)


def test_the_tied_tensor_is_sampled_under_the_heads_hessian(tied):
    model, prof = tied
    (item,) = [lp for lp in prof.linears if lp.block is None]      # one tied tensor
    W, H = _head_hessian(model, CFG)
    H = H.float()
    for t, t2 in item.samples:
        as_head = relative_error(W, encode_for_plan(W, t, H, lookup=False).w_hat, H)
        as_lookup = relative_error(W, encode_for_plan(W, t, None, lookup=True).w_hat, None)
        assert t2 == pytest.approx(as_head, rel=0.05), t         # the head's t², not the lookup's
        if t != "Q8_0":
            assert relative_error(W, encode_for_plan(W, t, None, lookup=True).w_hat, H) > \
                1.1 * as_head, t                                   # rounding under H helps
        assert as_lookup != pytest.approx(t2, rel=0.05), t


def test_a_lookup_profile_keeps_the_old_rounding_and_another_key(tied, tmp_path):
    model, prof = tied
    cfg = ProfileConfig(**{**CFG.__dict__, "gguf_tied": "lookup"})
    lookup = run_profile(str(model), FileProfileStore(tmp_path), config=cfg)
    assert lookup.key != prof.key
    (item,) = [lp for lp in lookup.linears if lp.block is None]
    W, _ = _head_hessian(model, CFG)
    for t, t2 in item.samples:
        want = relative_error(W, encode_for_plan(W, t, None, lookup=True).w_hat, None)
        assert t2 == pytest.approx(want, rel=1e-6), t
    with pytest.raises(ValueError, match="gguf_tied must be head or lookup"):
        ProfileConfig(target="gguf", gguf_tied="both")
