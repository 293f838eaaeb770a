"""Realistic synthetic allocation problems for tests and benchmarks (fixed seeds).

Shapes follow Qwen2 decoder blocks (q/k/v/o, gate/up/down); bytes come from option_bytes;
errors fall about 4x per Q bit and decay with rank, scaled by a U-shaped per-block sensitivity
(first and last blocks matter most, as the research note measured) and per-linear noise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from solver.bytes import Option, option_bytes
from solver.problem import AllocationProblem, Constraints, LinearMenu


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    tied_embeddings: bool

    def linears(self) -> list[tuple[str, int, int, int]]:
        """(name, out_features, in_features, block) for every compressible linear."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        parts = [("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h),
                 ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, h),
                 ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i)]
        return [(f"model.layers.{b}.{p}", o, n, b) for b in range(self.layers)
                for p, o, n in parts]

    def vocab_items(self) -> list[tuple[str, int, int]]:
        """(name, vocab, hidden) of the embedding and, when untied, the head: planned too."""
        emb = [("model.embed_tokens", self.vocab, self.hidden)]
        return emb if self.tied_embeddings else [*emb, ("lm_head", self.vocab, self.hidden)]

    def fixed_bytes(self) -> int:
        """The fp16 RMSNorm weights (everything else is planned)."""
        return (2 * self.layers + 1) * self.hidden * 2


QWEN2_1_5B = ModelShape(28, 1536, 8960, 256, 151936, True)
QWEN2_72B = ModelShape(80, 8192, 29568, 1024, 152064, False)


def option_grid(n_options: int, factor_bits: int = 4, group_size: int = 128) -> list[Option]:
    """About `n_options` options: Q bits x ranks (rank 0 = plain quantisation)."""
    bits = [2, 3, 4, 5, 6, 8]
    ranks = [0, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 768, 1024]
    n_bits = min(len(bits), max(1, round((n_options / 8) ** 0.5 * 2)))
    n_ranks = min(len(ranks), -(-n_options // n_bits))
    grid = [Option(b, r, factor_bits, group_size)
            for b, r in itertools.product(bits[:n_bits], ranks[:n_ranks])]
    return grid[:n_options] if len(grid) >= n_options else grid


def block_scores(layers: int, rng: np.random.Generator) -> np.ndarray:
    """U-shaped sensitivity like the note's fidelity (0.07 mid-model, ~0.3 at the ends)."""
    x = np.arange(layers)
    u = np.exp(-x / 1.5) + np.exp(-(layers - 1 - x) / 1.5)
    return 0.07 + 0.22 * u + rng.uniform(0, 0.04, layers)


def synthetic_problem(shape: ModelShape = QWEN2_1_5B, n_options: int = 40, seed: int = 0,
                      budget: int | None = None, bits_per_param: float | None = None,
                      constraints: Constraints | None = None, layers: int | None = None
                      ) -> tuple[AllocationProblem, dict[int, float], dict[str, int]]:
    """(problem, block_scores, block_of). `bits_per_param` sets the budget as a bpp figure;
    `layers` truncates the model (for small test instances)."""
    rng = np.random.default_rng(seed)
    if layers is not None:
        shape = ModelShape(layers, shape.hidden, shape.intermediate, shape.kv_dim,
                           shape.vocab, shape.tied_embeddings)
    scores = block_scores(shape.layers, rng)
    options = option_grid(n_options)
    kind_weight = {"q_proj": 1.0, "k_proj": 1.3, "v_proj": 1.6, "o_proj": 0.9,
                   "gate_proj": 1.1, "up_proj": 1.0, "down_proj": 1.4}
    menus = []
    block_of = {}
    for name, out_f, in_f, block in shape.linears():
        alpha = scores[block] * kind_weight[name.rsplit(".", 1)[1]] * rng.lognormal(0, 0.3)
        bits = np.array([o.bits for o in options], np.float64)
        ranks = np.array([o.rank for o in options], np.float64)
        err = alpha * 4.0 ** (-(bits - 2)) * (64.0 / (64.0 + ranks)) ** 0.45
        err *= rng.lognormal(0, 0.03, len(options))
        menus.append(LinearMenu(name, out_f, in_f, options,
                                [option_bytes(out_f, in_f, o) for o in options], err.tolist()))
        block_of[name] = block
    rank0 = [o for o in options if o.rank == 0]
    bits0 = np.array([o.bits for o in rank0], np.float64)
    for name, out_f, in_f in shape.vocab_items():   # a lookup / the head: Q alone
        err = float(scores.mean()) * rng.lognormal(0, 0.3) * 4.0 ** (-(bits0 - 2))
        menus.append(LinearMenu(name, out_f, in_f, rank0,
                                [option_bytes(out_f, in_f, o) for o in rank0], err.tolist()))
    problem = AllocationProblem(menus, shape.fixed_bytes(), None, constraints)
    if bits_per_param is not None:
        budget = problem.parse_budget(f"{bits_per_param}bpp")
    return (problem.with_budget(budget) if budget is not None else problem,
            {b: float(s) for b, s in enumerate(scores)}, block_of)


def random_problem(rng: np.random.Generator, n_linears: int, n_options: int,
                   budget_frac: float | None = None) -> AllocationProblem:
    """Tiny random instances (random costs/errors, not real shapes) for brute-force checks."""
    menus = []
    pool = [Option(b, r) for b in (2, 3, 4, 5, 6, 8) for r in (0, 8, 16, 32, 64)]
    for i in range(n_linears):
        k = int(rng.integers(1, n_options + 1))
        opts = [pool[j] for j in rng.choice(len(pool), k, replace=False)]
        costs = rng.integers(1, 40, k).tolist()
        errors = np.round(rng.random(k), 3).tolist()  # rounding makes ties likely
        menus.append(LinearMenu(f"model.layers.{i // 3}.lin{i % 3}", 8, 8, opts, costs, errors))
    problem = AllocationProblem(menus, int(rng.integers(0, 5)))
    if budget_frac is not None:
        lo, hi = problem.feasibility()
        problem = problem.with_budget(max(1, int(lo + budget_frac * (hi - lo))))
    return problem
