"""`bitplan bench scale --json --quick`: a synthetic fp16 checkpoint (16 blocks, hidden 512) is
profiled, compressed and evaluated streamed, in one child whose peak RSS above its own baseline
(interpreter + torch + transformers + tokenizer) stays under half the checkpoint's bytes."""

import pytest

from tests.bench._run import bench, positive


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    fig = bench("scale", tmp_path, "--quick", timeout=1200)
    m = fig["model"]
    assert (m["blocks"], m["hidden"], m["intermediate"], m["vocab"]) == (16, 512, 1408, 4096)
    assert m["weights_bytes"] >= 2 * m["params"]           # fp16 shards
    assert positive(fig["peak_rss_bytes"], fig["profile_s"], fig["compress_s"], fig["eval_s"])
    assert fig["peak_over_baseline_bytes"] <= 0.5 * m["weights_bytes"], fig
    assert fig["artifact_matches_plan"] is True
    assert fig["streamed_matches_inmemory"] is True
    assert positive(fig["profile_over_compress"])
    assert fig["shards"] is None
