"""The plain-text summary `bitplan plan` prints: bytes against the budget, the mix of formats, the
most and least protected blocks beside their measured sensitivity, and the plan's notes; and
the one `bitplan profile` prints (`summarize_profile`).

Pure formatting of a solved plan or a profile (`--json` / `--out` give the data itself)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from solver import AllocationProblem, Plan, format_bytes, option_bytes

if TYPE_CHECKING:
    from compressor.pipeline.profile_store import Profile

TOP = 3       # blocks shown at each end of the protection ranking
LABEL = 15    # width of the label column


@dataclass(frozen=True)
class BlockRow:
    """One block (or one linear outside every block) as the summary ranks it."""

    label: str            # "block 7", or the linear's name when it belongs to no block
    block: int | None
    params: int
    nbytes: int
    sensitivity: float | None   # the block's sum of alpha (the linear's alpha outside a block)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.params


def linear_bytes(plan: Plan, problem: AllocationProblem) -> dict[str, int]:
    """Stored bytes of each planned linear (the plan's own figures, else the byte formula)."""
    out = {}
    for name, opt in plan.assignments.items():
        if name in plan.linear_bytes:
            out[name] = plan.linear_bytes[name]
        else:
            lin = problem.by_name[name]
            out[name] = option_bytes(lin.out_features, lin.in_features, opt)
    return out


def block_rows(plan: Plan, profile: Profile, problem: AllocationProblem
               ) -> tuple[list[BlockRow], list[BlockRow]]:
    """(blocks, loose): each block's bytes over its params, most protected first (ties by block
    index); `loose` are the planned linears whose profile block is None, one row each."""
    nbytes = linear_bytes(plan, problem)
    by_linear = {lp.name: lp for lp in profile.linears}
    params: dict[int, int] = defaultdict(int)
    stored: dict[int, int] = defaultdict(int)
    loose = []
    for name in plan.assignments:
        lp = by_linear.get(name)
        n = problem.by_name[name].params
        if lp is None or lp.block is None:
            loose.append(BlockRow(name, None, n, nbytes[name], lp.alpha if lp else None))
            continue
        params[lp.block] += n
        stored[lp.block] += nbytes[name]
    sens = profile.block_sensitivity
    blocks = [BlockRow(f"block {b}", b, params[b], stored[b],
                       sens[b] if b < len(sens) else None) for b in params]
    blocks.sort(key=lambda r: (-r.bits_per_weight, r.block))
    loose.sort(key=lambda r: (-r.bits_per_weight, r.label))
    return blocks, loose


def _pct(part: float, whole: float, floor: bool = False) -> str:
    """A share to 0.01 %; `floor` rounds down, so a plan just under its budget never reads
    100.00 %."""
    if whole <= 0:
        return "-"
    share = 100 * part / whole
    return f"{math.floor(100 * share) / 100 if floor else share:.2f} %"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counter.items()))


def _line(label: str, text: str) -> str:
    return f"{label:<{LABEL}}{text}".rstrip()


def _solve_line(plan: Plan) -> str:
    if plan.optimal:
        status = "optimal"
    elif plan.gap is not None:
        status = f"not proven optimal, gap {100 * plan.gap:.2f} %"
    else:
        status = "not proven optimal"
    return f"{status} ({plan.method}), {plan.solve_ms:.1f} ms"


def _header(plan: Plan, profile: Profile, problem: AllocationProblem) -> list[str]:
    total_params = problem.basis.params
    budget = plan.budget if plan.budget is not None else problem.budget
    if budget:
        share = _pct(plan.total_bytes, budget, floor=True)
        used = (f"{format_bytes(plan.total_bytes)} of {format_bytes(budget)} budget ({share}): "
                f"{plan.total_bytes:,} of {budget:,} B")
    else:
        used = f"{format_bytes(plan.total_bytes)}: {plan.total_bytes:,} B (no budget)"
    kept = (f"{format_bytes(plan.fixed_bytes)} ({plan.fixed_bytes:,} B, "
            f"{_pct(plan.fixed_bytes, plan.total_bytes)} of the total)")
    return [
        f"plan for {profile.model_ref}: {len(plan.assignments)} tensors planned, "
        f"{total_params:,} params",
        _line("bytes", used),
        _line("bits/param", f"{plan.bits_per_param(total_params):.4f} (every parameter, kept ones included)"),
        _line("fixed (kept)", kept),
        _line("solve", _solve_line(plan)),
        _line("predicted KL", f"{plan.predicted_error:.4g}"),
    ]


def _by_label(plan: Plan, nbytes: dict[str, int], total: int) -> list[str]:
    """A GGUF or compressed-tensors plan's mix: tensors and bytes per llama.cpp type or vLLM
    scheme (+ LoRA rank), most bytes first."""
    count: Counter = Counter()
    share: Counter = Counter()
    for name, opt in plan.assignments.items():
        count[opt.label] += 1
        share[opt.label] += nbytes[name]
    w = max(8, *(len(t) + 2 for t in count))
    rows = [f"{'type' if any(o.gguf_type for o in plan.assignments.values()) else 'scheme':>{w}}"
            f"{'tensors':>9}{'bytes':>12}{'share':>10}"]
    for t in sorted(count, key=lambda t: (-share[t], t)):
        rows.append(f"{t:>{w}}{count[t]:>9}{format_bytes(share[t]):>12}"
                    f"{_pct(share[t], total):>10}")
    return rows


def _formats(plan: Plan, problem: AllocationProblem) -> list[str]:
    nbytes = linear_bytes(plan, problem)
    total = sum(nbytes.values())
    if all(opt.gguf_type or opt.ct for opt in plan.assignments.values()):
        return _by_label(plan, nbytes, total)
    count: Counter = Counter()
    share: Counter = Counter()
    ranks: dict[int, Counter] = defaultdict(Counter)
    for name, opt in plan.assignments.items():
        count[opt.bits] += 1
        share[opt.bits] += nbytes[name]
        ranks[opt.bits][opt.rank] += 1
    rows = [f"{'bits':>6}{'linears':>9}{'bytes':>12}{'share':>10}   ranks (rank ×linears)"]
    for bits in sorted(count):
        rows.append(f"{bits:>6}{count[bits]:>9}{format_bytes(share[bits]):>12}"
                    f"{_pct(share[bits], total):>10}   {_counts(ranks[bits])}")
    groups = Counter(opt.group_size for opt in plan.assignments.values())
    rows.append(_line("group sizes", _counts(groups)))
    factor = Counter(opt.factor_bits for opt in plan.assignments.values() if opt.rank > 0)
    if factor:
        rows.append(_line("factor bits", _counts(factor)))
    return rows


def _row(tag: str, r: BlockRow, sens_rank: dict[int, int], n_blocks: int) -> str:
    sens = "-" if r.sensitivity is None else f"{r.sensitivity:.4g}"
    if r.block is not None and r.block in sens_rank:
        sens += f" (#{sens_rank[r.block]} of {n_blocks})"
    return f"  {tag:<17}{r.label:<10}{r.bits_per_weight:>8.3f}{format_bytes(r.nbytes):>12}   {sens}"


def _blocks(plan: Plan, profile: Profile, problem: AllocationProblem) -> list[str]:
    blocks, loose = block_rows(plan, profile, problem)
    known = [r for r in blocks if r.sensitivity is not None]
    by_sens = sorted(known, key=lambda r: (-r.sensitivity, r.block))
    sens_rank = {r.block: k + 1 for k, r in enumerate(by_sens)}
    rows = [f"  {'':<17}{'':<10}{'bits/w':>8}{'bytes':>12}   sensitivity (sum of alpha, rank)"]
    if len(blocks) <= 2 * TOP:
        shown = [("most protected" if k == 0 else "", r) for k, r in enumerate(blocks)]
        if len(blocks) > 1:
            shown[-1] = ("least protected", blocks[-1])
        rows += [_row(tag, r, sens_rank, len(blocks)) for tag, r in shown]
    else:
        rows += [_row("most protected" if k == 0 else "", r, sens_rank, len(blocks))
                 for k, r in enumerate(blocks[:TOP])]
        rows.append(f"  {'':<17}… {len(blocks) - 2 * TOP} blocks between")
        rows += [_row("least protected" if k == 0 else "", r, sens_rank, len(blocks))
                 for k, r in enumerate(blocks[-TOP:])]
    rows += [_row("no block", r, {}, 0) for r in loose]
    return [f"per block (stored bits per weight, {len(blocks)} blocks)"] + rows


def summarize_plan(plan: Plan, profile: Profile, problem: AllocationProblem) -> str:
    """The plan in about 20 aligned lines of plain text (no trailing newline)."""
    lines = _header(plan, profile, problem) + [""] + _formats(plan, problem) + [""]
    lines += _blocks(plan, profile, problem) + [""]
    if plan.notes:
        lines += ["notes"] + [f"  - {note}" for note in plan.notes]
    else:
        lines.append(_line("notes", "none"))
    return "\n".join(lines)


def summarize_profile(profile: Profile, peak_rss: int | None = None) -> str:
    """`bitplan profile`'s plain text: what was measured, what it cost, and where the model is
    sensitive (the blocks' α, the items outside every block, the proxy's agreement)."""
    st, cfg = profile.stats, profile.config
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(
        (st.get("stage_s") or {}).items(), key=lambda kv: -kv[1]) if v >= 0.5)
    how = ("Fisher trace" if cfg.get("sensitivity") == "fisher" else "noise probe")
    lines = [f"profile of {profile.model_ref}: {len(profile.linears)} tensors, "
             f"{st.get('num_blocks', '?')} blocks (key {profile.key})",
             _line("measured", f"{st.get('wall_s', 0):.1f} s ({stages})"),
             _line("sensitivity", f"α from the {how}; " + (
                 "every GGUF type's error measured by our encoders" if cfg.get("target") ==
                 "gguf" else "every compressed-tensors scheme and LoRA rank measured"
                 if cfg.get("target") == "compressed-tensors"
                 else f"fitted E_i R² {st.get('fit_r2_mean', math.nan):.4f}"))]
    if peak_rss:
        lines.append(_line("peak memory", f"{format_bytes(peak_rss)} (this process)"))
    blocks = profile.block_sensitivity
    if blocks:
        mean = sum(blocks) / len(blocks) or 1.0
        ranked = sorted(range(len(blocks)), key=lambda j: -blocks[j])

        def show(js: list[int]) -> str:
            return ", ".join(f"{j} ({blocks[j] / mean:.1f}×)" for j in js)

        lines += [_line("highest α", "blocks " + show(ranked[:TOP]) + " of the mean"),
                  _line("lowest α", "blocks " + show(ranked[-TOP:]))]
    outside = [lp for lp in profile.linears if lp.block is None]
    if outside:
        lines.append(_line("outside blocks", "; ".join(f"{lp.name} α {lp.alpha:.3g}"
                                                       for lp in outside)))
    if (rho := st.get("spearman_alpha_vs_proxy")) is not None:
        lines.append(_line("proxy", f"Block Influence agrees with α at Spearman {rho:.2f}"))
    lines.append("(--json: the whole summary, per-block figures included; --plot FILE: a chart)")
    return "\n".join(lines)
