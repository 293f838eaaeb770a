"""The token embedding and the LM head as planned items (compressor.pipeline.vocab): packed
lookups, the two inventories, a tied tensor counted once, their profile records and α, an fp16
pin, and the refusal of a rank for a lookup."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import solver
from bench.streaming_baseline import CONFIG
from compressor.artifact.native import COMPRESSED, KEPT, ArtifactLinears, load_compressed
from compressor.checkpoint.headers import header_inventory
from compressor.checkpoint.loading import discover, load_model, load_tokenizer
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.compress import compress_model
from compressor.pipeline.evaluate import eval_sequences, evaluate, reference_logprobs
from compressor.pipeline.execute import ExecuteConfig, execute_plan
from compressor.pipeline.planning import build_problem
from compressor.pipeline.profile import open_profile, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.pipeline.vocab import (
    check_vocab_option,
    perturbed_table,
    vocab_config,
    vocab_hessian,
)
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.grids import QuantizedTensor
from compressor.runtime.modules import (
    CompressedEmbedding,
    CompressedLinear,
    Runtime,
    replace_linear,
    replace_vocab,
    set_runtime,
)
from compressor.runtime.packed import PackedSpec, dequantize_tiles
from solver.bytes import Option, option_bytes
from tests.helpers.models import WORD_VOCAB, save_model, tiny_lm, write_word_tokenizer

EMB, HEAD = "model.embed_tokens", "lm_head"
EXECUTE = ExecuteConfig(eval_seq_len=64, eval_seqs=4)
# weights of std 0.2, not transformers' 0.02: the output then moves measurably (KL ~1e-2, not
# ~1e-6) when a tensor is perturbed or rounded, well above what float32 log-sum-exps resolve
# (~5e-7 a position, which at std 0.02 moves a probe's α by ~3e-4 relative)
INIT = 0.2


def _written(path, tie: bool, **extra):
    """A random 2-block Qwen2 checkpoint with the word tokenizer, tied or untied."""
    model = tiny_lm("qwen2", 0, vocab=WORD_VOCAB, hidden=32, intermediate=72, positions=128,
                    tie=tie, **extra)
    save_model(model, path)
    write_word_tokenizer(path)
    return path


# -- 1. packed lookups ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_dequantize_tiles_are_rows_of_the_dequantized_tensor(bits, sym) -> None:
    vocab, dim, gs = 69, 20, 8   # 69 rows: the last tile partial; 20 = 8 + 8 + a partial 4
    W = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(bits))
    qt = QuantizedTensor.quantize(W, bits, gs, sym)
    spec = PackedSpec(vocab, dim, bits, gs, sym)
    dense = qt.dequantize()
    tiles = torch.tensor([8, 0, 5, 5, 3])   # unsorted, repeated, the partial last one
    got = dequantize_tiles(qt.packed, qt.meta.scale, qt.meta.zero, spec, tiles)
    assert got.shape == (8 * len(tiles), dim) and got.dtype == torch.float32
    for i, t in enumerate(tiles.tolist()):
        n = min(8, vocab - 8 * t)
        assert torch.equal(got[8 * i:8 * i + n], dense[8 * t:8 * t + n]), (i, t)
    every = dequantize_tiles(qt.packed, qt.meta.scale, qt.meta.zero, spec, torch.arange(9))
    assert torch.equal(every[:vocab], dense)


@pytest.mark.parametrize("option", [Option(3, 0, 4, 16), Option(4, 0, 4, 128),
                                    Option(2, 0, 4, 7, True), Option(16, 0)])
def test_compressed_embedding_lookup_equals_the_dense_rows(option) -> None:
    model = tiny_lm("qwen2", 0, vocab=131, hidden=40, intermediate=48, heads=4, kv_heads=2)
    W = model.model.embed_tokens.weight.detach().clone()
    dec = decompose(W, torch.eye(40), option, vocab_config(DecompositionConfig(), "embedding"))
    assert not dec.config.hadamard and dec.rank == 0
    # the last row (a partial tile), repeats, both sides of a tile edge
    ids = torch.tensor([[130, 0, 7, 8, 130, 63], [64, 65, 3, 3, 129, 128]])
    want = F.embedding(ids, dec.w_hat())
    packed, dense = CompressedEmbedding(dec, Runtime.PACKED), CompressedEmbedding(dec, Runtime.DENSE)
    for emb in (packed, dense):
        out = emb(ids)
        assert out.dtype == torch.float32 and torch.equal(out, want)
    assert packed.nbytes == option_bytes(131, 40, option)
    # in a model: model.to(bfloat16) changes the dtype lookups come out in, not the stored bytes
    emb = replace_vocab(model, EMB, "embedding", dec)
    assert model.get_input_embeddings() is emb
    model.to(torch.bfloat16)
    for runtime in (Runtime.PACKED, Runtime.DENSE):
        set_runtime(model, runtime)
        out = model.get_input_embeddings()(ids)
        assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))
    assert emb.nbytes == option_bytes(131, 40, option)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# -- 2. inventories and bytes --------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_header_inventory_equals_discover(tmp_path, tie) -> None:
    path = _written(tmp_path / "m", tie)
    heads, found = header_inventory(path), discover(load_model(path))

    def linears(inv) -> list[tuple]:
        return sorted((li.name, li.kind, li.block, li.out_features, li.in_features, li.has_bias)
                      for li in inv.linears)

    def kept(inv) -> list[tuple]:
        return sorted((k.name, tuple(k.shape), k.dtype, k.nbytes) for k in inv.kept)

    assert linears(heads) == linears(found)
    assert kept(heads) == kept(found) and heads.kept_bytes == found.kept_bytes
    vocab = [(EMB, "tied")] if tie else [(EMB, "embedding"), (HEAD, "head")]
    for inv in (heads, found):
        assert [(li.name, li.kind) for li in inv.linears if li.is_vocab] == vocab
        assert inv.linears[0].name == EMB and (inv.linears[-1].name == HEAD) != tie
        assert all(li.block is None for li in inv.linears if li.is_vocab)
        assert len(inv.linears) == 2 * 7 + len(vocab) and inv.num_blocks == 2
        assert not {f"{EMB}.weight", f"{HEAD}.weight"} & {k.name for k in inv.kept}


def test_tied_embedding_is_one_item_counted_once(tmp_path) -> None:
    path = _written(tmp_path / "m", True)
    prof = run_profile(str(path), FileProfileStore(tmp_path / "p"), config=CONFIG)
    problem = build_problem(prof, "4bpp")
    assert problem.names.count(EMB) == 1 and HEAD not in problem.names
    assert {o.rank for o in problem.by_name[EMB].options} == {0}
    params = sum(p.numel() for p in load_model(path).parameters())   # the tied tensor once
    assert problem.fp16_bytes == 2 * params
    assert problem.budget == math.floor(4 * params / 8)
    plan = solver.solve(problem)
    menu_bytes = sum(option_bytes(m.out_features, m.in_features, plan.assignments[m.name])
                     for m in problem.linears)
    assert plan.total_bytes == problem.fixed_bytes + menu_bytes <= problem.budget
    assert plan.bits_per_param(params) <= 4
    done = execute_plan(str(path), prof, plan, tmp_path / "a", EXECUTE)
    assert done.manifest.total_bytes == problem.fixed_bytes + menu_bytes
    assert done.manifest.kept_bytes == problem.fixed_bytes
    rec = done.manifest.linears[EMB]
    assert (rec["kind"], rec["head"], rec["nbytes"]) == (
        "tied", HEAD, option_bytes(WORD_VOCAB, 32, plan.assignments[EMB]))
    with safe_open(tmp_path / "a" / KEPT, "pt") as fh:
        assert not any(k.startswith((EMB, HEAD)) for k in fh.keys())
    loaded, _ = load_compressed(tmp_path / "a")
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(emb, CompressedEmbedding) and isinstance(head, CompressedLinear)
    assert head.q is emb.q    # one packed tensor read as both


# -- 3. the profile's vocabulary records ----------------------------------------------------------
def _kl(ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(ref ‖ logits) over every position, in float64."""
    r, m = F.log_softmax(ref.double(), -1), F.log_softmax(logits.double(), -1)
    return (r.exp() * (r - m)).sum(-1).mean().item()


def test_untied_profile_measures_embedding_and_head(tmp_path) -> None:
    path = _written(tmp_path / "m", False, initializer_range=INIT)
    prof = run_profile(str(path), FileProfileStore(tmp_path / "p"), config=CONFIG)
    recs = {lp.name: lp for lp in prof.linears if lp.block is None}
    assert list(recs) == [EMB, HEAD] and prof.linears[0].name == EMB
    for lp in recs.values():
        assert {s[1] for s in lp.samples} == {0}
        assert [s[0] for s in lp.samples] == list(CONFIG.q_bits)
        assert math.isfinite(lp.alpha) and lp.alpha > 0
    assert prof.block_sensitivity == pytest.approx(
        [sum(lp.alpha for lp in prof.linears if lp.block == j) for j in range(2)])
    # measured directly on the model in memory (float64): the probe's own noise, its H from
    # the normed final hidden states of the whole calibration, KL on the probe sequences
    model = load_model(path).double()
    calib = open_profile(str(path), CONFIG).calib
    probe, t = calib[:CONFIG.probe_seqs], CONFIG.probe_t
    final: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda mod, args: final.append(args[0]))
    with torch.no_grad():
        model(input_ids=calib)
        clean = model(input_ids=probe).logits
        X, Xp = final
        hook.remove()
        head_li = next(li for li in discover(model).linears if li.name == HEAD)
        H = vocab_hessian(StreamedModel(str(path)), head_li, X.float())
        W = model.lm_head.weight.float()
        head = perturbed_table(W, H, t, CONFIG.seed).double()
        alpha_head = _kl(clean, F.linear(model.model.norm(Xp), head)) / t ** 2
        table = perturbed_table(model.model.embed_tokens.weight.float(), torch.eye(32), t,
                                CONFIG.seed).double()
        alpha_emb = _kl(clean, model(inputs_embeds=table[probe]).logits) / t ** 2
    assert recs[HEAD].alpha == pytest.approx(alpha_head, rel=1e-4)
    assert recs[EMB].alpha == pytest.approx(alpha_emb, rel=1e-4)
    # and the head's samples are its H-weighted errors (an untied head is a linear)
    q3 = decompose(W, H, Option(3, 0), vocab_config(CONFIG.decomposition, "head"))
    assert recs[HEAD].samples[1][2] == pytest.approx(q3.q_only_rel_h_err ** 2, rel=1e-5)


# -- 4. an fp16 pin, and no rank for a lookup ----------------------------------------------------
def test_pinned_fp16_embedding_is_stored_fp16_and_evaluated_as_in_memory(tmp_path) -> None:
    path = _written(tmp_path / "m", True, initializer_range=INIT)   # tied: the pin covers the head
    prof = run_profile(str(path), FileProfileStore(tmp_path / "p"), config=CONFIG)
    problem = build_problem(prof, None, {"pinned": {EMB: {"bits": 16}}})
    lo, hi = problem.feasibility()
    plan = solver.solve(problem.with_budget(lo + (hi - lo) // 8))
    assert lo <= plan.total_bytes <= lo + (hi - lo) // 8
    assert (plan.assignments[EMB].bits, plan.assignments[EMB].rank) == (16, 0)
    assert all(o.bits < 16 for n, o in plan.assignments.items() if n != EMB)
    done = execute_plan(str(path), prof, plan, tmp_path / "a", EXECUTE)
    original = load_model(path)
    W = original.model.embed_tokens.weight.detach()
    assert done.manifest.linears[EMB]["nbytes"] == 2 * W.numel()
    with safe_open(tmp_path / "a" / COMPRESSED, "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(EMB + ".")}
    assert list(stored) == [f"{EMB}.q.packed"]                     # no scales: plain fp16
    packed = stored[f"{EMB}.q.packed"]
    assert packed.nbytes == 2 * W.numel()
    assert torch.equal(packed.view(torch.float16).view(W.shape), W.half())
    # in memory: the artifact's block linears, the embedding assigned 16 bits by compress_model
    model = load_model(path)
    decs = compress_model(model, {EMB: Option(16, 0)}, None, DecompositionConfig())
    assert torch.equal(decs[EMB].w_hat(), W.half().float())
    assert model.get_output_embeddings().q is model.get_input_embeddings().q
    linears = ArtifactLinears(tmp_path / "a")
    for name in (n for n in plan.assignments if n != EMB):
        replace_linear(model, name, linears[name], Runtime.DENSE)
    seqs = eval_sequences(load_tokenizer(path), EXECUTE.eval_seq_len, EXECUTE.eval_seqs)
    res = evaluate(model, seqs, reference_logprobs(original, seqs))
    assert done.metrics["kl"] > 1e-3
    assert done.metrics["kl"] == pytest.approx(res.kl, rel=1e-4)
    assert done.metrics["ppl"] == pytest.approx(res.ppl, rel=1e-5)
    assert done.metrics["top1"] == res.top1


def test_a_rank_for_an_embedding_is_refused() -> None:
    model = tiny_lm("qwen2", 0, hidden=32, intermediate=48, tie=True)
    with pytest.raises(ValueError, match=r"model\.embed_tokens is an embedding.*got rank 8"):
        compress_model(model, {EMB: Option(4, 8)}, None, DecompositionConfig())
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)   # nothing replaced
    for kind in ("embedding", "tied"):
        with pytest.raises(ValueError, match="Q alone"):
            check_vocab_option(EMB, kind, Option(3, 1))
        check_vocab_option(EMB, kind, Option(3, 0))
    check_vocab_option(HEAD, "head", Option(3, 8))   # an untied head is a linear: it may
