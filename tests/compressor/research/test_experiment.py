"""The experiment end to end on a tiny real model: every plan at matched bytes, measured for
real, the non-additivity guard tuned on the validation split, report and figures written."""

import dataclasses

import pytest

from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.research.experiment import headline, run_experiment
from solver.strategies import STRATEGIES
from tests.helpers.profiles import TINY_PROFILE

# group 32 with 64 as the planner's extra choice: on 72-wide rows both are real choices
CFG = dataclasses.replace(ProfileConfig.from_dict(TINY_PROFILE), group_size=32,
                          extra_groups=(64,))


@pytest.fixture(scope="module")
def experiment(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    prof = run_profile(str(tiny_model), FileProfileStore(data / "profiles"), config=CFG)
    out = data / "report"
    result = run_experiment(str(tiny_model), prof, budgets=("4.5bpp", "6bpp"), out_dir=out,
                            eval_seqs=4, refine_rounds=1, cache_dir=data / "cache" / prof.key)
    return prof, result, out


def test_every_plan_fits_its_budget_and_is_measured(experiment):
    prof, result, _ = experiment
    assert result["original_ppl"] > 1
    for row in result["budgets"]:
        s = row["strategies"]
        assert {"optimal", "refined", "uniform", "uniform_best"} <= set(s) \
            <= {"optimal", "refined", "uniform_best", *STRATEGIES}
        for name, v in s.items():
            assert set(v) >= {"bytes", "ppl", "kl", "top1", "predicted"}, name
            assert 0 < v["bytes"] <= row["budget_bytes"], name
            assert v["kl"] >= 0 and 0 <= v["top1"] <= 1 and v["ppl"] > 1, name
        # the solver's plan is optimal under the model: no baseline predicts lower
        assert all(s["optimal"]["predicted"] <= v["predicted"] + 1e-12
                   for n, v in s.items() if n in (*STRATEGIES, "uniform_best"))
        # the plan heatmap records bits, rank and group size of every linear
        assert len(row["heatmap"]) == len(prof.linears)
        assert all(g in (32, 64) for _, _, g in row["heatmap"].values())


def test_guard_is_tuned_on_validation_and_never_worse_there(experiment):
    prof, result, _ = experiment
    blocks = prof.stats["num_blocks"]
    for row in result["budgets"]:
        r = row["refined"]
        assert r["evaluations"] == 1 + (blocks + 1)  # one round: each block, then the re-solve
        assert r["tune_kl_after"] <= r["tune_kl_before"]
        assert set(r["block_scale"]) == {str(b) for b in range(blocks)}
        assert all(v > 0 for v in r["block_scale"].values())


def test_headline_and_report(experiment):
    _, result, out = experiment
    assert result["headline_plan"] == "refined"
    for key in ("excess_ppl_closed_pct_solver_plan", "kl_gain_vs_uniform_pct_solver_plan",
                "max_uniform_excess_ppl_pct", "section2"):
        assert key in result
    sec = result["section2"]["bits"]
    assert set(sec) == {"2", "3", "4"}
    for b in ("2", "3", "4"):
        for label in ("q_only", "q_lr"):
            cos = sec[b][label]["mean_output_cos"]
            assert 0 < cos <= 1 + 1e-9
            # cosine and relative error describe the same output error: cos ≥ √(1 − t²)
            assert cos >= (1 - sec[b][label]["mean_rel_err"] ** 2) ** 0.5 - 0.05
    assert sec["2"]["q_only"]["mean_output_cos"] < sec["4"]["q_only"]["mean_output_cos"]
    for name in ("REPORT.md", "experiment.json", "frontier_kl.png", "frontier_ppl.png",
                 "plan_bits.png", "plan_ranks.png", "plan_groups.png",
                 "predicted_vs_measured.png"):
        assert (out / name).stat().st_size > 0, name
    assert "refined plan vs uniform" in (out / "REPORT.md").read_text()


def test_headline_arithmetic():
    def strat(ppl, kl):
        return {"ppl": ppl, "kl": kl}

    result = {"original_ppl": 10.0, "budgets": [
        {"budget": "a", "strategies": {"uniform": strat(12.0, 0.4), "optimal": strat(11.0, 0.2),
                                       "refined": strat(10.5, 0.1)}},
        {"budget": "b", "strategies": {"uniform": strat(10.05, 0.01),  # < 1 % excess: not counted
                                       "optimal": strat(10.06, 0.02),
                                       "refined": strat(10.04, 0.005)}}]}
    h = headline(result)
    assert h["headline_plan"] == "refined" and h["headline_budgets"] == ["a"]
    assert h["excess_ppl_closed_pct"] == pytest.approx(75.0)
    assert h["kl_gain_vs_uniform_pct"] == pytest.approx(75.0)
    assert h["excess_ppl_closed_pct_solver_plan"] == pytest.approx(50.0)
    assert h["kl_gain_vs_uniform_pct_solver_plan"] == pytest.approx(50.0)
    assert h["optimal_never_worse_than_uniform_kl"] is True
    assert h["optimal_never_worse_than_uniform_kl_solver_plan"] is False  # 0.02 > 0.01 at b


def test_experiment_refuses_a_model_it_cannot_hold(monkeypatch):
    """A 7B-shaped profile (32 blocks of 4096 / 11008): the whole model at float32 with its
    Hessians needs ≥ 40 GiB; with less available the experiment stops before loading, with
    the figures and the streamed commands to use instead."""
    from compressor.checkpoint.memory import available_bytes
    from compressor.pipeline.profile_store import LinearProfile, Profile
    from compressor.research import experiment

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
              "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
              "down_proj": (4096, 11008)}
    linears = [LinearProfile(f"model.layers.{j}.{k}", j, m, n)
               for j in range(32) for k, (m, n) in shapes.items()]
    prof = Profile("k", "m", "", "", {}, 0, linears)
    per_block = 4 * sum(m * n for m, n in shapes.values()) + 4 * (4096 ** 2 + 11008 ** 2)
    assert experiment.whole_model_bytes(prof) == 32 * per_block
    assert 40 * 2**30 < experiment.whole_model_bytes(prof) < 41 * 2**30
    # this host's MemAvailable, in bytes: positive, within MemTotal, near a fresh reading
    with open("/proc/meminfo") as fh:
        info = {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in fh)}
    free = available_bytes("cpu")
    assert type(free) is int and 0 < free <= info["MemTotal"]
    assert abs(free - info["MemAvailable"]) <= info["MemTotal"] // 10
    need = experiment.whole_model_bytes(prof)
    monkeypatch.setattr(experiment, "available_bytes", lambda device: need)   # just fits
    experiment.check_fits(prof, "cpu")
    monkeypatch.setattr(experiment, "available_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match="holds the whole model"):
        experiment.check_fits(prof, "cpu")
    monkeypatch.setattr(experiment, "available_bytes", lambda device: 24 * 2**30)
    with pytest.raises(ValueError, match=r"at least 40\.6 GiB.*24\.0 GiB.*bitplan plan"):
        experiment.check_fits(prof, "cpu")
    with pytest.raises(ValueError, match="holds the whole model"):
        experiment.run_experiment("no/such/model", prof)   # refused before any load
    experiment.check_fits(Profile("k", "m", "", "", {}, 0, linears[:7]), "cpu")  # 1.3 GiB
    monkeypatch.setattr(experiment, "available_bytes", lambda device: None)   # unknown
    experiment.check_fits(prof, "cpu")
