"""The streamed plan evaluator (compressor.research.streamed_eval) on tiny real checkpoints:
its perplexity, KL and top-1 are those of `evaluate` on the model held whole with the same Ŵ
swapped in (embedding and head compressed too, tied and untied); its decompositions use the
original model's calibration Hessians; the on-disk cache serves a second evaluator; one block
is resident at a time, and more plans than fit one pass take more passes, same numbers."""

from __future__ import annotations

import pytest
import torch

from compressor.checkpoint.loading import load_model
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.compress import calibration_hessians
from compressor.pipeline.evaluate import evaluate, reference_logprobs
from compressor.pipeline.vocab import vocab_config
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import linear_weight
from compressor.research.streamed_eval import StreamedPlanEvaluator
from compressor.runtime.modules import Runtime, replace_linear, replace_vocab
from solver.bytes import Option
from tests.helpers.models import WORD_VOCAB, save_model, tiny_lm

CONFIG = DecompositionConfig(outer_iters=1, lr_iters=1, hadamard=False)
BATCH = 2   # 5 sequences: two full batches and a partial one


def _written(path, tie: bool):
    """A random 3-block Qwen2 checkpoint; weights of std 0.2 so that rounding moves the output
    measurably (KL ~1e-1, far above float32's log-sum-exp noise)."""
    model = tiny_lm("qwen2", 0, vocab=WORD_VOCAB, hidden=32, intermediate=72, positions=128,
                    blocks=3, tie=tie, initializer_range=0.2)
    return save_model(model, path)


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, WORD_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


CALIB, SEQS = _ids(4, 48, 0), _ids(5, 40, 1)


def _evaluator(path, cache_dir=None, **kw) -> StreamedPlanEvaluator:
    return StreamedPlanEvaluator(StreamedModel(str(path)), CALIB, SEQS, CONFIG,
                                 batch_size=BATCH, cache_dir=cache_dir, **kw)


def _plans(ev: StreamedPlanEvaluator) -> list[dict[str, Option]]:
    """Varied bits, ranks and groups on every linear plus the vocabulary items; half the
    linears at one 4-bit option; nothing (the original model)."""
    names = sorted(ev.linears)
    every = {n: Option(2 + i % 3, 4 * (i % 2), 4, 16 if i % 3 else 32)
             for i, n in enumerate(names)}
    every |= {n: Option(3, 0, 4, 16) for n in ev.vocab}
    return [every, {n: Option(4, 0, 4, 32) for n in names[::2]}, {}]


def _in_memory(path, ev: StreamedPlanEvaluator, plan: dict[str, Option]):
    """`evaluate` on the model loaded whole with the evaluator's Ŵ swapped in."""
    model = load_model(path)
    for name, opt in plan.items():
        dec = ev.decomposed(name, opt)
        if name in ev.vocab:
            replace_vocab(model, name, ev.vocab[name].kind, dec, Runtime.DENSE)
        else:
            replace_linear(model, name, dec, Runtime.DENSE)
    return evaluate(model, SEQS, reference_logprobs(load_model(path), SEQS, BATCH), BATCH)


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_figures_equal_the_in_memory_evaluation(tmp_path, tie):
    path = _written(tmp_path / "m", tie)
    ev = _evaluator(path, tmp_path / "cache")
    assert {li.kind for li in ev.vocab.values()} == ({"tied"} if tie else {"embedding", "head"})
    plans = _plans(ev)
    got = ev.measure_many(plans)
    assert ev.passes == 1   # three plans, every decomposition made, in one pass
    assert ev.decompositions == len({(n, o) for p in plans for n, o in p.items()})
    for plan, res in zip(plans, got, strict=True):
        want = _in_memory(path, ev, plan)
        assert res.ppl == pytest.approx(want.ppl, rel=1e-5)
        assert res.kl == pytest.approx(want.kl, rel=1e-5, abs=1e-7)
        assert res.top1 == want.top1
        assert (res.tokens, res.sequences, res.seq_len) == (want.tokens, 5, 40)
    assert got[0].kl > 0.1 > got[1].kl > 1e-3          # the plans really differ
    assert got[2].kl == pytest.approx(0, abs=1e-6) and got[2].top1 == 1.0
    assert ev.baseline() == got[2]                     # no pass: the reference is known
    assert ev.passes == 1


def test_decompositions_use_the_original_models_hessians(tmp_path):
    """Every linear is decomposed from H = XᵀX / tokens of the *original* model's calibration
    activations, even where the plan compresses the blocks before it (the streamed H and the
    whole model's differ in float32 summation order only: codes may flip at a tie, ~1e-5)."""
    path = _written(tmp_path / "m", False)
    ev = _evaluator(path)
    plan = _plans(ev)[0]
    ev.prepare([plan])
    model = load_model(path)
    hessians = calibration_hessians(model, CALIB, list(plan))
    modules = dict(model.named_modules())
    for name, opt in plan.items():
        kind = ev.vocab[name].kind if name in ev.vocab else None
        W = (modules[name].weight if kind else linear_weight(modules[name])).detach().float()
        want = decompose(W, hessians[name], opt, vocab_config(CONFIG, kind) if kind else CONFIG)
        assert ev.errors[(name, opt)] == pytest.approx(want.rel_h_err, rel=1e-3), name
        assert ev.cosines[(name, opt)] == pytest.approx(want.output_cosine, rel=1e-4), name


def test_on_disk_cache_serves_a_second_evaluator(tmp_path):
    path = _written(tmp_path / "m", True)
    first = _evaluator(path, tmp_path / "cache")
    plans = _plans(first)
    want = first.measure_many(plans)
    assert first.decompositions > 0
    assert list((tmp_path / "cache" / "decomposed").glob("*/linears/*.safetensors"))
    second = _evaluator(path, tmp_path / "cache")
    assert second.measure_many(plans) == want      # the same Ŵ, bit for bit
    assert second.decompositions == 0
    assert second.errors == {k: v for k, v in first.errors.items() if k in second.errors}
    # a miss is made by a pass of its own (only to the block that needs a Hessian) and kept
    name = sorted(second.linears)[0]   # block 0's down_proj
    W = second.w_hat(name, Option(5, 2, 4, 16))
    assert W.shape == (32, 72) and second.decompositions == 1 and second.passes == 2
    assert _evaluator(path, tmp_path / "cache").is_cached(name, Option(5, 2, 4, 16))
    assert not second.is_cached(name, Option(5, 2, 4, 16, symmetric=True))


def test_one_block_resident_and_plans_split_over_passes(tmp_path):
    """At every block forward of a pass no other block holds weights; with room for one
    plan's stream per pass, three plans take three passes and give the same numbers; progress
    is reported per block of every pass."""
    path = _written(tmp_path / "m", False)
    cache = tmp_path / "cache"
    want = _evaluator(path, cache).measure_many(_plans(_evaluator(path)))
    reports: list[tuple[str, float]] = []
    ev = _evaluator(path, cache, stream_bytes=1, progress=lambda s, f: reports.append((s, f)))
    assert ev.max_plans == 1
    resident: list[int] = []

    def count(module, _args, _kwargs) -> None:
        if any(p.device.type != "meta" for p in module.parameters()):   # not inputs' capture
            resident.append(sum(any(p.device.type != "meta" for p in b.parameters())
                                for b in ev.sm.blocks))

    for blk in ev.sm.blocks:
        blk.register_forward_pre_hook(count, with_kwargs=True)
    assert ev.measure_many(_plans(ev)) == want
    assert ev.passes == 2   # the empty plan is the reference: no stream of its own
    assert resident and set(resident) == {1}
    assert [f for _, f in reports] == [1 / 3, 2 / 3, 1.0] * 2
    assert all(s == "measure 1 plans" for s, _ in reports)


def test_refusals(tmp_path):
    ev = _evaluator(_written(tmp_path / "m", False))
    with pytest.raises(KeyError, match="does not have"):
        ev.measure({"model.layers.9.mlp.up_proj": Option(4)})
    with pytest.raises(ValueError, match="no tuning set"):
        ev.measure({}, tune=True)
    with pytest.raises(ValueError, match="rank 0"):
        ev.measure({"model.embed_tokens": Option(4, 2)})
