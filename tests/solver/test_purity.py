"""solver stays pure: importing it (and running a solve) pulls in nothing heavier."""

import subprocess
import sys

CODE = """
import sys
import solver, solver.strategies, solver.recipes, solver.synthetic, solver.cpsat
from solver.synthetic import random_problem
import numpy as np
solver.solve(random_problem(np.random.default_rng(0), 3, 3, budget_frac=0.5))
bad = sorted({m.split('.')[0] for m in sys.modules} & {
    'torch', 'transformers', 'sqlalchemy', 'fastapi', 'celery', 'service', 'compressor',
    'workers', 'pydantic'})
print(','.join(bad))
"""


def test_solver_imports_nothing_heavier():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
