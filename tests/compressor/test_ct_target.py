"""The compressed-tensors target (vLLM): exact bytes, the library's own packing, Hessian-aware
rounding, fused modules tied in the solver, and an export that transformers + compressed-tensors
(and PEFT, for the adapter) load as they are, giving bitplan's own numbers."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from transformers import AutoModelForCausalLM

import solver
from bench.ct_library import compare, library_model, our_model, planned_modules
from bench.tiny_llama import write_tiny_llama
from compressor import api
from compressor.artifact.ct_export import fused_schemes
from compressor.checkpoint.loading import load_tokenizer
from compressor.pipeline.ct_execute import CTWeights
from compressor.pipeline.evaluate import eval_sequences
from compressor.pipeline.execute import ExecuteConfig
from compressor.pipeline.planning import build_problem, uniform_ct_plan
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.quant.ct_int import dequantize_ct, encode_ct, pack_int32, unpack_int32
from compressor.quant.grids import signed_params
from compressor.quant.problem import h_sq
from solver.bytes import ct_dense, ct_option, option_bytes
from solver.problem import fused_groups

CFG = ProfileConfig(target="compressed-tensors", calib_seqs=8, fisher_seqs=4, seq_len=128)
EVAL = ExecuteConfig(eval_seqs=4, eval_seq_len=128)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_is_the_librarys_byte_for_byte(bits):
    torch.manual_seed(bits)
    for cols in (32, 96, 576, 100):
        codes = torch.randint(0, 1 << bits, (5, cols), dtype=torch.uint8)
        signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
        ours = pack_int32(codes, bits)
        assert torch.equal(ours, pack_to_int32(signed, bits))
        back = unpack_from_int32(ours, bits, torch.Size([5, cols]))
        assert torch.equal(back.to(torch.int32), signed.to(torch.int32))
        assert torch.equal(unpack_int32(ours, bits, cols), codes)


def _problem(rows=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs (as a layer's are): what error feedback exploits
    X = torch.randn(1024, 24, generator=g) @ torch.randn(24, cols, generator=g) \
        + 0.3 * torch.randn(1024, cols, generator=g)
    return W, X.T @ X / len(X)


@pytest.mark.parametrize("bits, group, rank", [(2, 32, 0), (4, 128, 0), (3, 64, 16), (8, 32, 8)])
def test_stored_tensors_are_the_planned_bytes(bits, group, rank):
    W, H = _problem()
    enc = encode_ct(W, H, bits, group, rank)
    stored = [enc.packed(), enc.scale, torch.tensor(enc.shape, dtype=torch.int64)]
    stored += [enc.lora_a, enc.lora_b] if rank else []
    assert enc.scale.dtype == torch.float16 and enc.packed().dtype == torch.int32
    assert sum(t.numel() * t.element_size() for t in stored) == \
        option_bytes(*W.shape, ct_option(bits, group, rank))
    assert int(enc.codes.max()) < 1 << bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_rounding_beats_nearest_on_the_same_grid(bits):
    W, H = _problem()
    gptq = W - encode_ct(W, H, bits, 32).w_base().float()
    s, _ = signed_params(W.unflatten(1, (-1, 32)), bits)
    half = 1 << (bits - 1)
    q = (W.unflatten(1, (-1, 32)) / s.float()[..., None]).round().clamp(-half, half - 1)
    rtn = W - dequantize_ct((q + half).to(torch.uint8).flatten(1), s, bits).float()
    assert h_sq(gptq, H) < 0.8 * h_sq(rtn, H)
    lora = W - encode_ct(W, H, bits, 32, rank=16).w_hat()
    assert h_sq(lora, H) < h_sq(gptq, H)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    model = write_tiny_llama(root / "tiny", tied=True)
    return model, run_profile(str(model), FileProfileStore(root / "store"), config=CFG), root


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """Untied, and an MLP width (520) that no 32-group divides: down_proj has no scheme."""
    root = tmp_path_factory.mktemp("ct-odd")
    model = write_tiny_llama(root / "tiny", intermediate=520)
    return model, run_profile(str(model), FileProfileStore(root / "store"), config=CFG), root


def test_menus_hold_only_what_vllm_can_run_and_fused_modules_share_a_scheme(odd):
    _, prof, _ = odd
    assert not any(lp.block is None for lp in prof.linears)   # embedding and head: fixed bytes
    problem = build_problem(prof)
    for lp in prof.linears:
        options = problem.by_name[lp.name].options
        if lp.in_features == 520:
            assert options == [ct_dense()]
        else:
            assert all(o.ct and lp.in_features % o.group_size == 0 for o in options)
            assert {o.bits for o in options} == set(range(2, 9))
    groups = fused_groups([lp.name for lp in prof.linears])
    assert len(groups) == 2 * 2   # q/k/v and gate/up in each of 2 blocks
    lo, hi = problem.feasibility()
    for frac in (0.05, 0.3, 0.6, 1.0):
        plan = solver.solve(problem.with_budget(int(lo + frac * (hi - lo))), "exact")
        assert plan.total_bytes <= plan.budget
        assert all(len({plan.assignments[n] for n in g}) == 1 for g in groups)


def test_export_loads_in_transformers_and_peft_with_our_logits(tied):
    model, prof, root = tied
    problem = build_problem(prof, constraints={"allowed_ranks": {"*": [8, 16]}})
    lo, hi = problem.feasibility()
    plan = solver.solve(problem.with_budget(lo + (hi - lo) // 3), "exact")
    assert {o.rank for o in plan.assignments.values()} <= {8, 16}
    out = root / "export"
    done = api.compress(model, prof, plan, out, config=EVAL)
    assert done.metrics["artifact_tensor_bytes"] == plan.total_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert fused_schemes(config, fused_groups(list(plan.assignments)))
    assert planned_modules(out) == sorted(plan.assignments)

    # the library's fp16 weights are bitplan's decode, bit for bit
    lib16 = library_model(out, run_compressed=False, compute_float32=False)
    base = CTWeights(out, list(plan.assignments), lora=False)
    for n in plan.assignments:
        assert torch.equal(lib16.get_submodule(n).weight.float(), base[n]), n
    tok = load_tokenizer(str(model))
    seqs = eval_sequences(tok, EVAL.eval_seq_len, EVAL.eval_seqs)
    ours_q = our_model(model, out, adapter=False)
    assert compare(ours_q, library_model(out), seqs)["max_logit_rel_diff"] <= 1e-5
    ours = our_model(model, out)
    with_adapter = compare(ours, library_model(out, adapter=True), seqs)
    without = compare(ours, library_model(out), seqs)
    assert with_adapter["max_logit_rel_diff"] <= 1e-5   # the issue asks ≤ 1e-3
    assert without["max_logit_rel_diff"] > 10 * with_adapter["max_logit_rel_diff"]
    # execute_ct's streamed measurement is the full model's, from the same tensors
    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    full = compare(source, ours, seqs)
    assert done.metrics["kl"] == pytest.approx(full["kl"], rel=1e-3)
    assert lib16.generate(seqs[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    # as the integration loads it by default (compressed modules, fp16 arithmetic on the CPU)
    packed = library_model(out, compute_float32=False)
    assert compare(ours_q, packed, seqs[:2])["max_logit_rel_diff"] <= 2e-2


def test_dense_modules_are_ignored_and_uniform_models_load(odd):
    model, prof, root = odd
    problem = build_problem(prof)
    tok = load_tokenizer(str(model))
    seqs = eval_sequences(tok, EVAL.eval_seq_len, 2)
    for bits in (4, 8):
        plan = uniform_ct_plan(problem, bits)
        out = root / f"uniform-{bits}"
        done = api.compress(model, prof, plan, out, config=EVAL)
        assert done.metrics["artifact_tensor_bytes"] == plan.total_bytes
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        downs = [n for n in plan.assignments if n.endswith("down_proj")]
        assert set(downs) <= set(qc["ignore"])
        assert [g["weights"]["num_bits"] for g in qc["config_groups"].values()] == [bits]
        got = compare(our_model(model, out), library_model(out), seqs)
        assert got["max_logit_rel_diff"] <= 1e-5
