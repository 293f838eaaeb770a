"""Streaming (compressor.checkpoint.stream) reproduces the in-memory code: same profile key and records,
the same artifact bytes (byte for byte on the CPU that recorded the fixture, within float-order
tolerance on another), α within float noise; every block is read once per profile."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import solver
from bench.streaming_baseline import (
    CONFIG,
    FIXTURE,
    compare,
    measure_with_vocab,
)
from bench.synthetic import Shape, write_checkpoint
from compressor import api
from compressor.checkpoint import stream
from compressor.checkpoint.loading import load_model
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.execute import ExecuteConfig, execute_plan
from compressor.pipeline.profile import run_profile, stream_inventory
from compressor.pipeline.profile_store import FileProfileStore, Profile, profile_key
from solver.bytes import Option, option_bytes
from tests.helpers.models import write_tiny_model

BASELINE = json.loads(FIXTURE.read_text())


def measure(model_ref: str, work) -> tuple[dict, list]:
    """bench.streaming_baseline's measurement as the baseline ran (the embedding, a profiled
    item since PROFILE_CODE_VERSION 3, kept out of the plan as it was then), and the key of
    the same inputs under both code versions."""
    got, vocab = measure_with_vocab(model_ref, work)
    prof = api.profile(model_ref, CONFIG, store=work / "profiles")   # stored: read back
    assert prof.key == profile_key(prof.weights_hash, prof.calib_hash, prof.config)
    assert prof.key != got["key"]          # the baseline's, under code version 2
    return got, vocab


def assert_matches(got: dict, want: dict, alpha_tol: float) -> None:
    """Byte for byte on the CPU that recorded the fixture; elsewhere within the float-order
    tolerances of `compare` (another CPU's BLAS sums in another order)."""
    c = compare(got, want, alpha_tol)
    assert c["within_tolerance"], c
    assert got["key"] == want["key"] and got["fixed_bytes"] == want["fixed_bytes"]
    assert got["metrics"]["artifact_tensor_bytes"] == want["metrics"]["artifact_tensor_bytes"]
    assert got["metrics"]["planned_bytes"] == got["metrics"]["artifact_tensor_bytes"]
    if got["linears"][0]["samples"] == want["linears"][0]["samples"]:   # the recording CPU
        assert c["bit_identical"], c


def assert_vocab_record(vocab: list, name: str, shape: tuple[int, int], want: dict) -> None:
    """The one tied embedding record: no block, Q-only samples at the profile's bits, α > 0;
    it is what the baseline's fixed bytes held at float32."""
    assert [(lp.name, lp.block, lp.out_features, lp.in_features) for lp in vocab] == [
        (name, None, *shape)]
    (lp,) = vocab
    assert {s[1] for s in lp.samples} == {0}
    assert sorted({s[0] for s in lp.samples}) == list(CONFIG.q_bits)
    assert all(0 < s[2] < 1 for s in lp.samples)
    assert math.isfinite(lp.alpha) and lp.alpha > 0
    assert want["fixed_bytes"] - 4 * shape[0] * shape[1] > 0


def test_tiny_streamed_equals_inmemory_baseline(tmp_path):
    tiny = write_tiny_model(tmp_path / "tiny", layers=2)
    got, vocab = measure(str(tiny), tmp_path / "w")
    assert_vocab_record(vocab, "model.embed_tokens", (264, 32), BASELINE["tiny"])
    # a random tiny model's KL is ~1e-7: α agrees to float noise relative to the largest α
    assert_matches(got, BASELINE["tiny"], alpha_tol=0.02)


@pytest.mark.slow
def test_demo_streamed_equals_inmemory_baseline(demo_model_path, tmp_path):
    # the demo baseline was recorded with 2 torch threads; another count (another test module
    # sets 1 at import) changes BLAS summation order, which flips a few rounding ties
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, vocab = measure(str(demo_model_path), tmp_path / "w")
    finally:
        torch.set_num_threads(threads)
    assert_vocab_record(vocab, "model.embed_tokens", (4096, 192), BASELINE["demo"])
    assert_matches(got, BASELINE["demo"], alpha_tol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama"])
def test_streamed_forward_equals_model(tmp_path, family):
    path = write_tiny_model(tmp_path / family, layers=3, family=family)
    model = load_model(path)
    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    sm = StreamedModel(str(path), vocab_chunk=50)   # several vocabulary chunks
    h, _ = sm.inputs(ids)
    for j in range(sm.num_blocks):
        with sm.block(j) as blk:
            h = sm.run(blk, h)
        assert all(p.device.type == "meta" for p in sm.blocks[j].parameters())
    st = sm.head_stats(h, targets=ids, ref=h)
    want = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(st.target_logp(), want, atol=1e-5)
    assert torch.equal(st.argmax, logp.argmax(-1))
    assert st.kl.abs().max() < 1e-6


def test_profile_reads_each_block_once(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "m", layers=3)
    loads: list[int] = []
    real = stream.StreamedModel.block

    def counting(self, j):
        loads.append(j)
        return real(self, j)

    monkeypatch.setattr(stream.StreamedModel, "block", counting)
    prof = run_profile(str(path), FileProfileStore(tmp_path / "p"), config=CONFIG)
    assert loads == [0, 1, 2]   # probes ride along: no block is replayed per probe
    assert all(lp.alpha >= 0 for lp in prof.linears) and max(lp.alpha for lp in prof.linears) > 0
    assert prof.stats["peak_rss_bytes"] > 0 and "sampling" in prof.stats["stage_s"]


def test_fp16_checkpoint_keeps_fp16_and_exact_bytes(tmp_path):
    """Item 6: kept tensors stay at the stored dtype (fp16) in the budget and the artifact."""
    model = str(write_checkpoint(tmp_path / "m", Shape("qwen2", 2, 64, 96, 4, 2, 4096)))
    inv = stream_inventory(StreamedModel(model))
    assert {k.dtype for k in inv.kept} == {"float16"}
    opt = Option(4, 0)
    plan = solver.Plan({li.name: opt for li in inv.linears}, 0, 0.0, "uniform", False)
    plan.total_bytes = inv.kept_bytes + sum(option_bytes(li.out_features, li.in_features, opt)
                                            for li in inv.linears)
    prof = Profile("k", model, "", "", CONFIG.to_dict(), inv.kept_bytes, [])
    done = execute_plan(model, prof, plan, tmp_path / "a", ExecuteConfig(eval_seq_len=32,
                                                                          eval_seqs=2))
    kept = load_file(tmp_path / "a" / "kept.safetensors")
    assert {t.dtype for t in kept.values()} == {torch.float16}
    assert done.metrics["artifact_tensor_bytes"] == plan.total_bytes
    assert done.metrics["ppl"] > 1 and done.metrics["kl"] >= 0


def test_resident_block_keeps_fp16_linears_and_computes_in_float32(tmp_path):
    """A resident block holds its linears' weights at the checkpoint's fp16 and upcasts each
    only for its own forward: the output equals the block run with every weight upcast."""
    model = str(write_checkpoint(tmp_path / "m", Shape("llama", 1, 64, 96, 4, 2, 512)))
    sm = StreamedModel(model)
    h = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    with sm.block(0) as blk:
        dtypes = {n: p.dtype for n, p in blk.named_parameters()}
        assert {d for n, d in dtypes.items() if n.endswith("proj.weight")} == {torch.float16}
        assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}
        streamed = sm.run(blk, h)
        assert {p.dtype for n, p in blk.named_parameters() if n.endswith("proj.weight")} == \
            {torch.float16}                           # restored after each forward
        for m in blk.modules():
            if isinstance(m, torch.nn.Linear):
                m._parameters["weight"] = torch.nn.Parameter(m.weight.float(),
                                                             requires_grad=False)
        whole = sm.run(blk, h)
    assert torch.equal(streamed, whole)
