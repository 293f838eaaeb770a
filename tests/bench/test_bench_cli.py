"""`bitplan bench` reaches the CLI through the "bitplan.commands" entry point (the service never
imports bench/), registering it stays torch-free, and the benchmarks stand on their own: no
module under bench/ imports the tests."""

import ast
import subprocess
import sys

import pytest

from bench.cli import BENCHES
from service.cli import build_parser
from service.settings import REPO_ROOT


def test_bench_is_registered_through_the_entry_point(capsys):
    parser = build_parser()
    for name in BENCHES + ["all"]:
        args = parser.parse_args(["bench", name, "--quick", "--json"])
        assert (args.name, args.quick, args.func.__module__) == (name, True, "bench.cli")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "no-such-bench"])
    assert "invalid choice" in capsys.readouterr().err


def test_building_the_cli_imports_no_torch():
    code = ("import sys; from service.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_no_bench_module_imports_the_tests():
    offenders = []
    for path in (REPO_ROOT / "bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [(path.name, n) for n in names if n.split(".")[0] == "tests"]
    assert offenders == []
