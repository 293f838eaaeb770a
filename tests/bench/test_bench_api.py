"""`bitplan bench api`: every request it sends is answered and counted, none is an error (the
per-team job limit must not turn the benchmark into a 429 counter), and every plan is solved."""

from tests.bench._run import bench, positive


def test_bench_api_counts_what_it_sends(tmp_path, demo_model_path):
    fig = bench("api", tmp_path, "--quick")      # 24 requests from 4 clients
    assert {"requests", "sent", "clients", "p50_ms", "p95_ms", "max_ms", "errors", "throttled",
            "single_client_p50_ms", "throughput_rps", "time_to_solved_p50_ms",
            "time_to_solved_p95_ms", "solved", "team_job_limit"} <= set(fig), fig
    assert fig["quick"] is True and fig["sent"] == fig["requests"] == 24 and fig["clients"] == 4
    assert fig["errors"] == 0 and fig["throttled"] == 0, fig
    assert fig["solved"] == 24, fig
    assert positive(fig["p50_ms"], fig["p95_ms"], fig["single_client_p50_ms"],
                    fig["throughput_rps"], fig["time_to_solved_p50_ms"])
    assert fig["p50_ms"] <= fig["p95_ms"] <= fig["max_ms"]
    assert fig["time_to_solved_p50_ms"] <= fig["time_to_solved_p95_ms"]
