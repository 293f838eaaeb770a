"""`bitplan bench NAME [--json]`: benchmarks print figures as ratios measured in the same run.

The service's CLI does not import this package (bench stands above it); it finds `register`
through the "bitplan.commands" entry point declared in pyproject.toml."""

from __future__ import annotations

import importlib
import json

# name -> module under bench exposing `run(args)`. Options live here, not in the bench modules:
# registering them must not import torch for every CLI call.
BENCHES = ["quant", "solver", "profile", "api", "e2e", "load", "runtime", "sampling", "scale",
           "real", "gguf", "compressed-tensors"]
MODULES = {"compressed-tensors": "vllm_export"}   # names that are not module names


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES) + ", or all")
    p.add_argument("name", choices=BENCHES + ["all"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke-sized run (fewer linears, plans, budgets, requests): the same "
                        "figures, computed the same way, on less; marked \"quick\" in the JSON")
    p.add_argument("--cpsat-time-limit", type=float, default=None,
                   help="solver: seconds CP-SAT may spend per instance (default 60)")
    p.set_defaults(func=cmd_bench)


def _run_one(name: str, args) -> dict:
    try:
        mod = importlib.import_module(f"bench.{MODULES.get(name, name)}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{MODULES.get(name, name)}":
            return {"error": f"benchmark {name!r} is not available in this build"}
        raise
    out = mod.run(args)
    if getattr(args, "quick", False) and isinstance(out, dict):
        out["quick"] = True
    return out


def cmd_bench(args) -> int:
    names = BENCHES if args.name == "all" else [args.name]
    result = {n: _run_one(n, args) for n in names}
    out = result if args.name == "all" else result[args.name]
    text = json.dumps(out, indent=None if args.json else 2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0
