"""`bitplan bench load --quick`: a short bounded run (4 clients, 4 s) really serves plans — each
one a POST and at least one poll, none an error — and its rate, latencies and duration agree
(the 50-client, 60-second figure belongs to the benchmark itself, not to the test suite)."""

from bench.load import DRAIN_S
from tests.bench._run import bench, positive, rate_fits_latency


def test_bench_load_short_run_reports_figures_and_no_errors(tmp_path, demo_model_path):
    fig = bench("load", tmp_path, "--quick")
    assert fig["quick"] is True and fig["clients"] == 4
    assert fig["errors"] == 0 and fig["error_kinds"] == {}, fig
    assert 4 <= fig["seconds"] <= 4 + DRAIN_S + 5, fig   # bounded: the run, then the drain
    assert fig["plans_solved"] > 0, fig
    # every solved plan took its POST and ≥ 1 GET of its job, each counted as a request
    assert fig["requests"] >= 2 * fig["plans_solved"], fig
    assert positive(fig["throughput_rps"], fig["p50_ms"], fig["post_p95_ms"],
                    fig["time_to_solved_p95_ms"])
    assert fig["p50_ms"] <= fig["p95_ms"] <= fig["max_ms"] < 30_000, fig
    # rate = requests over the run's wall time, and no faster than the clients' latencies allow
    assert fig["requests"] / fig["throughput_rps"] >= 4 * 0.9
    assert rate_fits_latency(fig["throughput_rps"], fig["p50_ms"], fig["clients"]), fig
