"""`bitplan bench runtime --quick` on a tiny model: both runtimes load through from_pretrained in
fresh processes, the packed linears hold exactly the planned bytes, packed and dense logits
agree, and every speed/memory figure is a measured positive number. (Packed < dense peak RSS
is the full run's claim on the demo model: a tiny model's dense cache is below RSS noise.)"""

from tests.bench._run import bench, positive


def test_bench_runtime_quick(tmp_path, tiny_model):
    fig = bench("runtime", tmp_path, "--quick", env={"BITPLAN_BENCH_MODEL": str(tiny_model)})
    assert fig["quick"] is True and fig["plan"].startswith("uniform b3")
    assert fig["resident_linear_bytes"] == fig["planned_bytes"] > 0
    assert fig["resident_equals_planned"] is True
    assert fig["from_pretrained"] is True
    assert fig["loaded_by"].startswith("AutoModelForCausalLM.from_pretrained")
    assert 0 <= fig["max_rel_logit_diff"] <= 1e-3
    assert fig["generated_tokens"] == 16 and fig["prefill_tokens"] == 128
    assert positive(fig["peak_rss_packed"], fig["peak_rss_dense"], fig["decode_tok_s_packed"],
                    fig["decode_tok_s_dense"], fig["prefill_tok_s_packed"],
                    fig["prefill_tok_s_dense"], fig["predicted_rss_saving"])
    # the dense cache the prediction counts is m·n fp32 values per linear, 3-bit packed (plus fp16 scales, zeros and rank-8 factors) is far less
    assert fig["predicted_rss_saving"] > 4 * fig["planned_bytes"]
    assert 3 < fig["bits_per_param_linears"] < 8   # tiny widths: rank-8 factors and g32 scales weigh
