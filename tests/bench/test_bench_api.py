"""`bitplan bench api`: every request it sends is answered and counted, none is an error (the
per-team job limit must not turn the benchmark into a 429 counter), every plan is solved, and
the latencies and the request rate it prints are consistent with one another."""

from tests.bench._run import bench, positive, rate_fits_latency


def test_bench_api_counts_what_it_sends(tmp_path, demo_model_path):
    fig = bench("api", tmp_path, "--quick")      # 24 requests from 4 clients
    assert fig["quick"] is True and fig["sent"] == fig["requests"] == 24 and fig["clients"] == 4
    assert fig["teams"] == fig["clients"]
    assert fig["errors"] == 0 and fig["throttled"] == 0, fig
    assert fig["solved"] == 24, fig
    assert fig["team_job_limit"].startswith("lifted"), fig
    assert positive(fig["p50_ms"], fig["p95_ms"], fig["single_client_p50_ms"],
                    fig["throughput_rps"], fig["time_to_solved_p50_ms"])
    assert fig["p50_ms"] <= fig["p95_ms"] <= fig["max_ms"]
    # the clients' timeout is 30 s: a slower answer would have been counted as an error, so a
    # larger figure is not milliseconds of answered requests
    assert fig["max_ms"] < 30_000, fig
    assert fig["time_to_solved_p50_ms"] <= fig["time_to_solved_p95_ms"]
    assert rate_fits_latency(fig["throughput_rps"], fig["p50_ms"], fig["clients"]), fig
