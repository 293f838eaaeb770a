"""Write the experiment's Markdown report and figures."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.checkpoint.headers import block_index
from compressor.pipeline.profile_store import Profile
from compressor.research.plots import frontier_png, heatmap_png, profile_plot_png, scatter_png


def _fmt(v, nd=3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def write_report(result: dict, prof: Profile, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(result, indent=1))
    curves: dict[str, list] = {}
    kl_curves: dict[str, list] = {}
    scatter: dict[str, list] = {}
    for row in result["budgets"]:
        for name, s in row["strategies"].items():
            curves.setdefault(name, []).append((s["bytes"] / 1e6, s["ppl"]))
            kl_curves.setdefault(name, []).append((s["bytes"] / 1e6, s["kl"]))
            scatter.setdefault(name, []).append((s["predicted"], s["kl"]))
    (out / "frontier_ppl.png").write_bytes(frontier_png(
        curves, "stored bytes (MB)", "test perplexity", "measured quality vs bytes"))
    (out / "frontier_kl.png").write_bytes(frontier_png(
        kl_curves, "stored bytes (MB)", "KL to original (nats/token)", "KL vs bytes", logy=True))
    (out / "predicted_vs_measured.png").write_bytes(scatter_png(
        scatter, "predicted ΔKL (Σ α·E)", "measured KL", "predicted vs measured"))
    (out / "profile.png").write_bytes(profile_plot_png(prof))
    mid = result["budgets"][len(result["budgets"]) // 2]
    in_blocks = {n: v for n, v in mid["heatmap"].items() if block_index(n) is not None}
    kinds = sorted({n.split(".", 3)[-1].split(".", 1)[-1] for n in in_blocks})
    blocks = sorted({block_index(n) for n in in_blocks})
    cell = {(block_index(n), n.split(".", 3)[-1].split(".", 1)[-1]): v
            for n, v in in_blocks.items()}
    which = "refined" if "refined" in mid["strategies"] else "optimal"
    for i, what in enumerate(("bits", "ranks", "groups")):
        grid = [[cell[(b, k)][i] for k in kinds] for b in blocks]
        (out / f"plan_{what}.png").write_bytes(heatmap_png(
            grid, [f"block {b}" for b in blocks], kinds,
            f"{which} plan {'group size' if what == 'groups' else what} @ {mid['budget']}"))

    lines = [f"# bitplan experiment — {result['model']}", "",
             f"Original test perplexity: **{result['original_ppl']:.3f}**.", "",
             f"## Headline ({result['headline_plan']} plan vs uniform at matched bytes)", "",
             f"- Share of uniform's excess perplexity removed (min over budgets with ≥ 1 % "
             f"excess): **{_fmt(result['excess_ppl_closed_pct'], 1)} %** "
             f"(solver plan alone: {_fmt(result.get('excess_ppl_closed_pct_solver_plan'), 1)} %)",
             f"- KL reduction vs uniform (same budgets): **"
             f"{_fmt(result['kl_gain_vs_uniform_pct'], 1)} %** (solver plan alone: "
             f"{_fmt(result.get('kl_gain_vs_uniform_pct_solver_plan'), 1)} %)",
             f"- Never worse than uniform (KL): "
             f"{result['optimal_never_worse_than_uniform_kl']}",
             "- `refined` = the solver's plan after the non-additivity guard: per-block α "
             "recalibrated on the validation split, re-solved at the same budget; all figures "
             "below are on the test split.", "",
             "## Every budget and strategy", "",
             "| budget | strategy | MB | bits/param | ppl | KL | top-1 | predicted ΔKL |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["budgets"]:
        for name, s in row["strategies"].items():
            lines.append(f"| {row['budget']} | {name} | {s['bytes'] / 1e6:.3f} | "
                         f"{s['bits_per_param']:.2f} | {s['ppl']:.3f} | {s['kl']:.4f} | "
                         f"{s['top1']:.3f} | {s['predicted']:.4f} |")
        if "refined" in row:
            r = row["refined"]
            lines.append(f"| {row['budget']} | guard: {r['evaluations']} validation evals, "
                         f"validation KL {r['tune_kl_before']:.4f} → {r['tune_kl_after']:.4f} "
                         f"| | | | | | |")
    outside = [f"`{n}` {v[0]} bits, group {v[2]}" for n, v in mid["heatmap"].items()
               if n not in in_blocks]
    if outside:   # the embedding and head: planned, but in no block of the heat maps
        lines += ["", f"Outside the blocks at {mid['budget']}: " + "; ".join(outside) + "."]
    sec = result["section2"] or {"rank": 32, "num_blocks": 0, "bits": {}}
    lines += ["", f"## The note's section 2 on this model (uniform plans, rank {sec['rank']})",
              "", f"Output cosine: per linear, pooled over the calibration tokens; compounded "
              f"= cos^{sec['num_blocks']} (the note's estimate), beside the measured top-1.", "",
              "| bits | Q-only rel. err | Q+LR rel. err | Q-only cos (compounded) | "
              "Q+LR cos (compounded) | Q-only ppl | Q+LR ppl | Q-only top-1 | Q+LR top-1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b, row in sec["bits"].items():
        q, lr = row["q_only"], row["q_lr"]
        cq = (f"{q['mean_output_cos']:.4f} ({q['cos_compounded']:.3f})"
              if "mean_output_cos" in q else "—")
        cl = (f"{lr['mean_output_cos']:.4f} ({lr['cos_compounded']:.3f})"
              if "mean_output_cos" in lr else "—")
        lines.append(f"| {b} | {q['mean_rel_err']:.3f} | {lr['mean_rel_err']:.3f} | {cq} | {cl} "
                     f"| {q['ppl']:.2f} | {lr['ppl']:.2f} | {q['top1']:.3f} | {lr['top1']:.3f} |")
    lines += ["", "Figures: `frontier_ppl.png`, `frontier_kl.png`, `plan_bits.png`, "
              "`plan_ranks.png`, `plan_groups.png`, `predicted_vs_measured.png`, `profile.png`.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
