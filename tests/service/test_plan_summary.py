"""Issue 22 item 7: `bitplan plan` prints a readable summary whose figures are the plan's own;
`--json` prints the previous JSON object and `--out` writes the full plan that `Plan.from_dict`
reads back. The CLI runs for real on the demo model (its shipped profile is stored first)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest

from solver import Plan

BUDGET = "2.75bpp"
JSON_KEYS = {"total_bytes", "budget", "bits_per_param", "predicted_kl", "optimal", "gap",
             "solve_ms", "notes", "linears"}
HIST = re.compile(r"^\s+(\d+)\s+(\d+)\s+[\d.]+ (?:B|KiB|MiB|GiB)\s+([\d.]+) %\s+(.*)$")
BLOCK = re.compile(r"^  (most protected|least protected|)\s+block (\d+)\s+([\d.]+)\s")


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory, demo_model_path):
    """A data dir holding the demo's profile, stored by `bitplan profile` (its shipped one)."""
    from service.cli import main
    from service.settings import get_settings

    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITPLAN_DATA_DIR", str(home))
        get_settings.cache_clear()
        assert main(["profile", str(demo_model_path), "--json"]) == 0
    get_settings.cache_clear()
    return home


@pytest.fixture
def demo(demo_home, demo_model_path, monkeypatch, capsys):
    """(model ref, run(argv) -> stdout, the stored profile) with the demo's data dir set."""
    from service.cli import main, planning
    from service.settings import get_settings

    monkeypatch.setenv("BITPLAN_DATA_DIR", str(demo_home))
    get_settings.cache_clear()
    capsys.readouterr()
    ref = str(demo_model_path)

    def run(*argv: str) -> str:
        assert main(["plan", ref, "--budget", BUDGET, *argv]) == 0
        return capsys.readouterr().out

    yield ref, run, planning.stored_profile(ref)
    get_settings.cache_clear()


def _solved(prof):
    from service.cli.planning import solve_for

    return solve_for(prof, BUDGET)


def _bits_per_weight(plan: Plan, prof) -> dict[int, float]:
    """Per block (the embedding, in no block, has its own line)."""
    nbytes, params = Counter(), Counter()
    for lp in (lp for lp in prof.linears if lp.block is not None):
        nbytes[lp.block] += plan.linear_bytes[lp.name]
        params[lp.block] += lp.out_features * lp.in_features
    return {b: 8 * nbytes[b] / params[b] for b in params}


def test_summary_figures_are_the_plans(demo):
    ref, run, prof = demo
    out = run()
    problem, plan = _solved(prof)
    lines = out.splitlines()
    assert 12 <= len(lines) <= 30, out
    assert not out.lstrip().startswith("{")
    assert f"{plan.total_bytes:,} of {plan.budget:,} B" in out
    assert f"{plan.bits_per_param(problem.basis.params):.4f}" in out
    assert f"{plan.fixed_bytes:,} B" in out
    assert f"{plan.predicted_error:.4g}" in out
    assert ("optimal (exact)" if plan.optimal else "not proven optimal") in out

    hist = [HIST.match(line) for line in lines]
    rows = {int(m[1]): int(m[2]) for m in hist if m}
    assert sum(rows.values()) == len(plan.assignments) == len(prof.linears)
    assert rows == Counter(o.bits for o in plan.assignments.values())
    assert sum(float(m[3]) for m in hist if m) == pytest.approx(100, abs=0.05)
    groups = Counter(o.group_size for o in plan.assignments.values())
    assert "group sizes    " + ", ".join(f"{g} ×{n}" for g, n in sorted(groups.items())) in out

    bpw = _bits_per_weight(plan, prof)
    named = [(m[1], int(m[2]), float(m[3])) for m in map(BLOCK.match, lines) if m]
    assert len(named) == 6 and len(bpw) == 12            # top 3 and bottom 3 of 12 blocks
    assert named[0][0] == "most protected" and named[3][0] == "least protected"
    assert "no block         model.embed_tokens" in out      # the tied embedding, planned
    top, bottom = [b for _, b, _ in named[:3]], [b for _, b, _ in named[3:]]
    rest = [v for b, v in bpw.items() if b not in top]
    assert min(bpw[b] for b in top) >= max(rest)
    assert max(bpw[b] for b in bottom) <= min(v for b, v in bpw.items() if b not in bottom)
    assert [bpw[b] for b in top + bottom] == sorted((bpw[b] for b in top + bottom), reverse=True)
    for _, b, shown in named:
        assert shown == pytest.approx(bpw[b], abs=5e-4)
        assert re.search(rf"block {b}\s.*\s{prof.block_sensitivity[b]:.4g} \(#", out)
    assert "notes          none" in out if not plan.notes else all(n in out for n in plan.notes)


def test_json_prints_the_previous_object(demo):
    ref, run, prof = demo
    got = json.loads(run("--json"))
    problem, plan = _solved(prof)
    assert set(got) == JSON_KEYS
    assert got["total_bytes"] == plan.total_bytes and got["budget"] == plan.budget
    assert got["bits_per_param"] == round(plan.bits_per_param(problem.basis.params), 4)
    assert got["linears"] == {n: o.to_dict() for n, o in plan.assignments.items()}
    assert got["notes"] == plan.notes and got["optimal"] == plan.optimal


def test_out_writes_the_full_plan(demo, tmp_path):
    ref, run, prof = demo
    path = tmp_path / "plan.json"
    out = run("--out", str(path))
    assert f"plan JSON written to {path}" in out and "per block" in out
    plan = Plan.from_dict(json.loads(path.read_text()))
    _, solved = _solved(prof)
    assert plan.total_bytes == solved.total_bytes and plan.assignments == solved.assignments
    assert f"{plan.total_bytes:,} of" in out
    path.unlink()
    assert json.loads(run("--out", str(path), "--json"))["total_bytes"] == plan.total_bytes
    assert Plan.from_dict(json.loads(path.read_text())).total_bytes == plan.total_bytes


def test_json_and_yaml_exclude_each_other(demo, capsys):
    ref, run, prof = demo
    from service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", ref, "--budget", BUDGET, "--json", "--yaml"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    _, plan = _solved(prof)
    assert run("--yaml").startswith(f"# bitplan plan: method=exact total_bytes={plan.total_bytes}")


# ------------------------------------------------ the formatter alone, on a synthetic profile

def _synthetic(blockless: str | None = None):
    from compressor import api
    from tests.helpers.profiles import synthetic_profile

    prof = synthetic_profile()
    if blockless:     # e.g. a head that becomes plannable: a linear outside every block
        last = prof.linears[-1]
        prof.linears[-1] = dataclasses.replace(last, name=blockless, block=None)
    lo, hi = api.problem(prof).feasibility()
    budget = lo + (hi - lo) // 4          # a quarter of the way up the feasible range
    problem = api.problem(prof, budget)
    return prof, problem, api.plan(prof, budget, base=problem)


def test_a_linear_outside_every_block_gets_its_own_line():
    from service.cli.plan_summary import summarize_plan

    prof, problem, plan = _synthetic("lm_head")
    out = summarize_plan(plan, prof, problem)
    row = next(line for line in out.splitlines() if "lm_head" in line)
    assert row.split()[:2] == ["no", "block"]
    assert float(row.split()[3]) == pytest.approx(
        8 * plan.linear_bytes["lm_head"] / problem.by_name["lm_head"].params, abs=5e-4)
    assert f"{prof.linears[-1].alpha:.4g}" in row
    assert ", 3 blocks)" in out     # the blocks are the others; lm_head is in none of them


def test_few_blocks_are_all_listed_and_notes_one_per_line():
    from service.cli.plan_summary import summarize_plan

    prof, problem, plan = _synthetic()
    plan = dataclasses.replace(plan, notes=["first note", "second note"], optimal=False,
                               gap=0.0123)
    lines = summarize_plan(plan, prof, problem).splitlines()
    named = [m for m in map(BLOCK.match, lines) if m]
    assert sorted(int(m[2]) for m in named) == [0, 1, 2]
    assert named[0][1] == "most protected" and named[-1][1] == "least protected"
    assert lines[-3:] == ["notes", "  - first note", "  - second note"]
    assert any("not proven optimal, gap 1.23 %" in line for line in lines)


def test_profile_prints_a_summary_and_json_only_when_asked(demo, demo_model_path, capsys):
    from service.cli import main

    _, _, prof = demo
    assert main(["profile", str(demo_model_path)]) == 0
    out = capsys.readouterr().out
    assert not out.lstrip().startswith("{") and len(out.splitlines()) < 15
    assert f"key {prof.key}" in out and f"{len(prof.linears)} tensors" in out
    blocks = prof.block_sensitivity
    top = max(range(len(blocks)), key=blocks.__getitem__)
    line = next(x for x in out.splitlines() if x.startswith("highest α"))
    assert line.split("blocks ")[1].startswith(
        f"{top} ({blocks[top] / (sum(blocks) / len(blocks)):.1f}×)")
    assert "Fisher trace" in out
    assert main(["profile", str(demo_model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == prof.key
