"""Evaluation is deterministic and its numbers mean what they say (on the demo model)."""

import pytest

from compressor.checkpoint.loading import load_model, load_tokenizer
from compressor.pipeline.evaluate import eval_sequences, evaluate, reference_logprobs, unigram_ppl


@pytest.fixture(scope="module")
def demo(demo_model_path):
    return load_model(demo_model_path), load_tokenizer(demo_model_path)


def test_eval_is_deterministic_and_self_kl_is_zero(demo):
    model, tok = demo
    seqs = eval_sequences(tok, seq_len=128, n_seqs=8)
    assert seqs.equal(eval_sequences(tok, seq_len=128, n_seqs=8))  # fixed sequences, fixed order
    ref = reference_logprobs(model, seqs)
    a = evaluate(model, seqs, reference=ref)
    b = evaluate(model, seqs, reference=ref)
    assert a == b
    assert a.kl == pytest.approx(0.0, abs=1e-6)
    assert a.top1 == 1.0
    assert a.tokens == 8 * 127


def test_trained_model_beats_unigram_by_far(demo):
    model, tok = demo
    seqs = eval_sequences(tok, seq_len=256, n_seqs=16)
    res = evaluate(model, seqs)
    uni = unigram_ppl(tok, seqs)
    assert 1.0 < res.ppl < uni / 3


def test_perturbed_model_has_positive_kl(demo):
    import copy

    import torch

    model, tok = demo
    seqs = eval_sequences(tok, seq_len=64, n_seqs=4)
    ref = reference_logprobs(model, seqs)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        w = noisy.model.layers[3].mlp.down_proj.weight
        w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(0)) * w.std() * 0.5)
    res = evaluate(noisy, seqs, reference=ref)
    assert res.kl > 1e-6 and res.top1 < 1.0


def test_bitplan_eval_streams_a_checkpoint_with_the_in_memory_numbers(tmp_path, capsys):
    """`bitplan eval MODEL` on a plain checkpoint streams it block by block
    (compressor.pipeline.evaluate.stream_evaluate) and reports what evaluating it whole gives."""
    import json

    from service.cli import main
    from tests.helpers.models import write_tiny_model

    tiny = write_tiny_model(tmp_path / "tiny", layers=2)
    assert main(["eval", str(tiny), "--seqs", "3", "--seq-len", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seqs = eval_sequences(load_tokenizer(str(tiny)), 32, 3)
    want = evaluate(load_model(str(tiny)), seqs)
    assert got["tokens"] == want.tokens and got["sequences"] == 3
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-5)
