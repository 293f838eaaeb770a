"""bitplan's solver: optimal per-linear (bits, rank) under an exact byte budget.

Pure numbers (numpy, scipy, ortools, pyyaml); imports nothing else of bitplan.
"""

from solver.allocate import Method, frontier, frontier_plan, solve
from solver.budget import (
    BudgetBasis,
    BudgetError,
    InfeasibleBudget,
    format_bytes,
    fp16_reference_bytes,
)
from solver.bytes import Option, option_bytes
from solver.dp import FrontierTooLarge
from solver.problem import (
    AllocationProblem,
    Constraints,
    LinearMenu,
    Plan,
    parse_budget,
    tie_per_block,
)

__all__ = [
    "AllocationProblem", "BudgetBasis", "BudgetError", "Constraints", "FrontierTooLarge", "InfeasibleBudget",
    "LinearMenu", "Method", "Option", "Plan", "format_bytes", "fp16_reference_bytes", "frontier", "frontier_plan",
    "option_bytes", "parse_budget", "solve", "tie_per_block",
]
