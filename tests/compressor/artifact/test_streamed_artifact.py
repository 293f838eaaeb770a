"""The streamed artifact writer (compressor.artifact.safetensors_writer, artifact.ArtifactWriter) and what rides on
it: files byte-identical to safetensors' own writer, execute_plan holding one block's linears at
a time, kept tensors copied in chunks, shared Hessians equal to per-linear float64 sums, and
per-stage peak memory."""

from __future__ import annotations

import json
import weakref
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import solver
from bench.streaming_baseline import CONFIG
from compressor.artifact import native as artifact
from compressor.artifact import safetensors_writer as st_writer
from compressor.artifact.archive import archive_sha256
from compressor.artifact.native import (
    COMPRESSED,
    KEPT,
    load_compressed,
    tensors_sha256,
    verify_artifact,
)
from compressor.artifact.safetensors_writer import SafetensorsWriter
from compressor.checkpoint.headers import block_index
from compressor.checkpoint.memory import StageClock
from compressor.checkpoint.tensor_reader import Checkpoint
from compressor.pipeline import execute
from compressor.pipeline.execute import DirCompressStore, ExecuteConfig, execute_plan
from compressor.pipeline.profile_store import Profile
from compressor.quant.hessian import HessianHooks
from solver.bytes import Option, option_bytes
from tests.helpers.models import tiny_qwen2, tokens, write_tiny_model


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, dt in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.uint8,
                            torch.int8, torch.int16, torch.int32, torch.int64, torch.float64,
                            torch.bool]):
        t = torch.randn(3 + k, 5, generator=g) * 50
        out[f"t{(7 * k) % 10}.{dt}"] = t.to(dt)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    out["scalar"] = torch.tensor(2.5)
    return out


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_writer_file_is_byte_identical_to_save_file(tmp_path, metadata):
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    with SafetensorsWriter(tmp_path / "ours.safetensors", metadata) as w:
        for name in reversed(list(tensors)):       # any order in, the reference order out
            w.add(name, tensors[name])
    assert (tmp_path / "ours.safetensors").read_bytes() == \
        (tmp_path / "ref.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.spool"))
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writer_keeps_no_tensor_and_copies_file_ranges_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(st_writer, "COPY_CHUNK", 7)   # many chunks, none aligned
    src = {"a": torch.arange(1000, dtype=torch.int32), "b": torch.randn(33, 17).half()}
    save_file(src, tmp_path / "src.safetensors")
    ck = Checkpoint(tmp_path, [tmp_path / "src.safetensors"])
    w = SafetensorsWriter(tmp_path / "out.safetensors")
    t = torch.randn(64, 64)
    ref = weakref.ref(t)
    w.add("t", t)
    del t
    assert ref() is None                              # appended to disk, not held
    for name in ("a", "b"):
        e = ck.entry(name)
        w.add_file_range(name, e.dtype, e.shape, e.file, e.start)
    assert w.nbytes == 64 * 64 * 4 + 4000 + 33 * 17 * 2
    w.finish()
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["a"], src["a"]) and torch.equal(out["b"], src["b"])
    with pytest.raises(ValueError, match="twice"):
        with SafetensorsWriter(tmp_path / "dup.safetensors") as d:
            d.add("x", torch.ones(2))
            d.add("x", torch.ones(2))
    assert not (tmp_path / "dup.safetensors").exists()
    assert not list(tmp_path.glob("*.spool"))


def _tiny_plan(path) -> tuple[solver.Plan, Profile]:
    from compressor.checkpoint.stream import StreamedModel
    from compressor.pipeline.profile import stream_inventory

    inv = stream_inventory(StreamedModel(str(path)))
    opts = [Option(2, 0, 4, 128), Option(3, 5, 4, 32), Option(4, 0, 4, 64)]
    plan = solver.Plan({li.name: replace(opts[i % 3], rank=0) if li.is_vocab else opts[i % 3]
                        for i, li in enumerate(inv.linears)}, 0, 0.0, "fixed", False)
    plan.total_bytes = inv.kept_bytes + sum(
        option_bytes(li.out_features, li.in_features, plan.assignments[li.name])
        for li in inv.linears)
    return plan, Profile("k", str(path), "", "", CONFIG.to_dict(), inv.kept_bytes, [])


def test_execute_holds_one_block_of_linears_and_writes_reference_files(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "m", layers=3)
    plan, prof = _tiny_plan(path)
    alive: list[weakref.ref] = []
    most = {"blocks": 0}
    real = artifact.ArtifactWriter.add_linear

    def add_linear(self, name, dec):
        real(self, name, dec)
        alive.append((block_index(name), weakref.ref(dec.q.packed)))
        held = {b for b, r in alive if r() is not None}
        most["blocks"] = max(most["blocks"], len(held))

    monkeypatch.setattr(artifact.ArtifactWriter, "add_linear", add_linear)
    store = execute.MemoryCompressStore()     # keeps every linear: the artifact must not care
    done = execute_plan(str(path), prof, plan, tmp_path / "a", ExecuteConfig(eval_seq_len=32,
                                                                             eval_seqs=2))
    assert most["blocks"] == 1                 # no decomposed linear outlives its block
    assert done.metrics["artifact_tensor_bytes"] == plan.total_bytes
    # the same plan again, every linear kept in a store: identical files, and the store's
    # tensors are the artifact's
    again = execute_plan(str(path), prof, plan, tmp_path / "b",
                         ExecuteConfig(eval_seq_len=32, eval_seqs=2), store=store)
    # the store holds three blocks' linears and the vocabulary tensor (no block)
    assert most["blocks"] == 4 and len(store.names()) == len(plan.assignments)
    for f in (COMPRESSED, KEPT, "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    packed = load_file(tmp_path / "a" / COMPRESSED)
    for name in plan.assignments:
        for k, t in store.get(name).tensors().items():
            assert torch.equal(packed[f"{name}.{k}"], t)
    # layout: byte for byte what safetensors' save_file writes for the same tensors
    save_file(packed, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "a" / COMPRESSED).read_bytes()
    kept = load_file(tmp_path / "a" / KEPT)
    src = Checkpoint(path)
    assert all(torch.equal(t, src.get(n)) for n, t in kept.items() if n in src)
    manifest = verify_artifact(tmp_path / "a")
    # the tied embedding is compressed: one packed tensor the head reads too, no kept alias
    assert manifest.tied == {}
    rec = manifest.linears["model.embed_tokens"]
    assert rec["kind"] == "tied" and rec["head"] == "lm_head"
    assert "lm_head.weight" not in kept and "model.embed_tokens.weight" not in kept
    assert list(manifest.linears) == list(plan.assignments)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        sorted([*manifest.files, "bitplan_manifest.json"])   # no spool or temp files
    assert archive_sha256(tmp_path / "a")[0] == archive_sha256(tmp_path / "a")[0]
    assert tensors_sha256(tmp_path / "a" / COMPRESSED) == tensors_sha256(tmp_path / "b" / COMPRESSED)
    model, _ = load_compressed(tmp_path / "a")
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert done.metrics["ppl"] == again.metrics["ppl"] and done.metrics["kl"] > 0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temp dirs left


def test_resumed_execute_writes_the_same_artifact(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "m", layers=2)
    plan, prof = _tiny_plan(path)
    cfg = ExecuteConfig(eval_seq_len=32, eval_seqs=2)
    full = execute_plan(str(path), prof, plan, tmp_path / "full", cfg)
    store = DirCompressStore(tmp_path / "store")
    real = execute.decompose
    calls = []

    def dying(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(execute, "decompose", dying)
    with pytest.raises(KeyboardInterrupt):
        execute_plan(str(path), prof, plan, tmp_path / "r", cfg, store=store)
    assert len(store.names()) == 3 and not (tmp_path / "r").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    monkeypatch.setattr(execute, "decompose", real)
    resumed = execute_plan(str(path), prof, plan, tmp_path / "r", cfg, store=store)
    assert resumed.resumed == 3
    for f in (COMPRESSED, KEPT):
        assert (tmp_path / "r" / f).read_bytes() == (tmp_path / "full" / f).read_bytes()
    assert resumed.metrics["ppl"] == full.metrics["ppl"]


@pytest.mark.parametrize("batches", [1, 3])
def test_shared_hessians_equal_per_linear_float64_sums(batches):
    model = tiny_qwen2()
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.0.")
             and n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"))]
    ref: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def exact(name):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            xtx = (x.T @ x).double()
            ref[name] = ref[name] + xtx if name in ref else xtx.clone()
        return fn

    handles = [mods[n].register_forward_pre_hook(exact(n)) for n in names]
    hooks = HessianHooks(model, names)
    seqs = tokens(2 * batches, 16)
    with torch.no_grad():
        for i in range(batches):
            hooks.batch()
            model(input_ids=seqs[2 * i:2 * i + 2])
    for h in handles:
        h.remove()
    H = hooks.result(seqs.numel())
    for n in names:
        assert torch.equal(H[n], (ref[n] / seqs.numel()).float()), n
    q, k, v = (H[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and H["model.layers.0.mlp.gate_proj"] is H["model.layers.0.mlp.up_proj"]
    assert len({id(t) for t in H.values()}) == 4


def test_stage_clock_peaks_are_per_stage():
    clock = StageClock()
    size = 400 << 20
    with clock.stage("big"):
        t = torch.ones(size // 4)
        del t
    with clock.stage("small"), clock.stage("inner"):
        pass
    peaks = clock.report()["stage_peak_rss_bytes"]
    assert peaks["big"] - peaks["small"] > 0.9 * size   # the window was reset between stages
    assert peaks["small"] >= peaks["inner"]
    assert clock.report()["peak_rss_bytes"] >= peaks["big"]
    json.dumps(clock.report())
