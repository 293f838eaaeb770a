"""`bitplan bench e2e --json`: the experiment on the demo model (profile reused when stored)."""

from __future__ import annotations

from service.settings import DEMO_MODEL, get_settings


def run(args) -> dict:
    from service.commands.planning import ensure_profile
    from service.experiment import run_experiment

    ref = str(DEMO_MODEL)
    prof = ensure_profile(ref, quiet=True)
    out = get_settings().data_dir / "reports" / f"e2e-{prof.key[:12]}"
    result = run_experiment(ref, prof, out_dir=out)
    budgets = [{"budget": r["budget"], "budget_bytes": r["budget_bytes"],
                "strategies": r["strategies"], "refined": r.get("refined")}
               for r in result["budgets"]]
    return {"original_ppl": result["original_ppl"], "budgets": budgets,
            "excess_ppl_closed_pct": result["excess_ppl_closed_pct"],
            "kl_gain_vs_uniform_pct": result["kl_gain_vs_uniform_pct"],
            "headline_plan": result["headline_plan"],
            "excess_ppl_closed_pct_solver_plan": result["excess_ppl_closed_pct_solver_plan"],
            "kl_gain_vs_uniform_pct_solver_plan": result["kl_gain_vs_uniform_pct_solver_plan"],
            "headline_budgets": result["headline_budgets"],
            "excess_ppl_closed_pct_all_budgets": result["excess_ppl_closed_pct_all_budgets"],
            "kl_gain_vs_uniform_pct_all_budgets": result["kl_gain_vs_uniform_pct_all_budgets"],
            "max_uniform_excess_ppl_pct": result["max_uniform_excess_ppl_pct"],
            "optimal_never_worse_than_uniform_kl":
                result["optimal_never_worse_than_uniform_kl"],
            "section2": result["section2"], "seconds": result["seconds"],
            "decompositions": result["decompositions"], "report": str(out / "REPORT.md")}
