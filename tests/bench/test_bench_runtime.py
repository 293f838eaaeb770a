"""`bitplan bench runtime --quick` on a tiny model: both runtimes load through from_pretrained in
fresh processes, the packed linears and the packed (tied) embedding hold exactly the bytes of the
plan (recomputed here from the model's shapes), packed and dense logits agree, the dense cache is
the dense weights' size, and every speed/memory figure is a measured positive number. (Packed < dense peak RSS is the full
run's claim on the demo model: a tiny model's dense cache is below RSS noise.)"""

from dataclasses import replace

import pytest

from solver.bytes import Option, option_bytes
from tests.bench._run import bench, linear_shapes, positive

QUICK_OPTION = Option(3, 8, 4, 32)   # the quick plan: uniform b3 r8, 4-bit factors, g32
VOCAB_OPTION = replace(QUICK_OPTION, rank=0)   # the tied embedding's: Q alone


def test_bench_runtime_quick(tmp_path, tiny_model):
    fig = bench("runtime", tmp_path, "--quick", env={"BITPLAN_BENCH_MODEL": str(tiny_model)})
    assert fig["quick"] is True and fig["plan"].startswith("uniform b3")
    blocks = linear_shapes(tiny_model, vocab=False)
    shapes = linear_shapes(tiny_model)
    (vocab,) = [s for s in shapes if s not in blocks]    # the tied embedding, [264, 32]
    params = sum(m * n for m, n in shapes)
    planned = (sum(option_bytes(m, n, QUICK_OPTION) for m, n in blocks)
               + option_bytes(*vocab, VOCAB_OPTION))
    assert fig["planned_bytes"] == planned
    assert fig["resident_linear_bytes"] == planned and fig["resident_equals_planned"] is True
    assert fig["bits_per_param_linears"] == pytest.approx(8 * planned / params)
    assert fig["from_pretrained"] is True and fig["packed_embeddings"] == 1
    assert fig["loaded_by"].startswith("AutoModelForCausalLM.from_pretrained")
    assert 0 <= fig["max_rel_logit_diff"] <= 1e-3
    assert fig["generated_tokens"] == 16 and fig["prefill_tokens"] == 128
    assert fig["torch_threads"] == 1
    assert positive(fig["peak_rss_packed"], fig["peak_rss_dense"], fig["decode_tok_s_packed"],
                    fig["decode_tok_s_dense"], fig["prefill_tok_s_packed"],
                    fig["prefill_tok_s_dense"])
    # the dense cache holds every linear's m·n weights in the model's float dtype (fp16 or fp32),
    # the tied head's too, and the embedding's own float32 Ŵ: what the dense child really held
    emb = 4 * vocab[0] * vocab[1]
    assert fig["predicted_rss_saving"] in (2 * params + emb, 4 * params + emb), fig
    assert fig["predicted_rss_saving"] == fig["dense_cache_held_bytes"], fig
    assert fig["predicted_rss_saving"] > 4 * fig["planned_bytes"]
    assert 3 < fig["bits_per_param_linears"] < 8   # tiny widths: rank-8 factors and g32 scales weigh
