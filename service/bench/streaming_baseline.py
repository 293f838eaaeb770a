"""What the streaming path must reproduce: a profile and an artifact of one model under a cheap
profile configuration and a fixed mixed plan, through the public entry points only
(`run_profile`, `execute_plan`). `tests/compressor/fixtures/streaming_baseline.json` holds these
figures as the in-memory code (before streaming) computed them; the streaming tests and
`bitplan bench scale` compare against it, and `python -m service.bench.streaming_baseline
OUT.json` records them again."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import solver
from compressor.artifact import COMPRESSED, KEPT, tensors_sha256
from compressor.execute import ExecuteConfig, execute_plan
from compressor.profile import ProfileConfig, run_profile
from compressor.profile_store import FileProfileStore
from service.bench.tiny import write_tiny_model
from service.settings import DEMO_MODEL, REPO_ROOT
from solver.bytes import Option, option_bytes

FIXTURE = REPO_ROOT / "tests" / "compressor" / "fixtures" / "streaming_baseline.json"
CONFIG = ProfileConfig(calib_seqs=8, probe_seqs=4, seq_len=64, q_bits=(2, 3, 4),
                       anchors=((3, 0.5),), extra_groups=(256,), group_bits=(2, 4))
EXECUTE = ExecuteConfig(eval_seq_len=64, eval_seqs=6)
# cycled over the linears: Q-only and Q + LR, two group sizes, a rank that is not a multiple
OPTIONS = (Option(2, 0, 4, 128), Option(3, 5, 4, 128), Option(4, 0, 4, 256), Option(2, 16, 3, 64))


def mixed_plan(names: list[str]) -> solver.Plan:
    assign = {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}
    return solver.Plan(assign, 0, 0.0, "fixed", False)


def measure(model_ref: str, work: Path) -> dict:
    prof = run_profile(model_ref, FileProfileStore(work / "profiles"), config=CONFIG)
    plan = mixed_plan([lp.name for lp in prof.linears])
    plan.total_bytes = prof.fixed_bytes + sum(
        option_bytes(lp.out_features, lp.in_features, plan.assignments[lp.name])
        for lp in prof.linears)
    done = execute_plan(model_ref, prof, plan, work / "artifact", EXECUTE)
    return {"key": prof.key, "fixed_bytes": prof.fixed_bytes,
            "linears": [lp.to_dict() for lp in prof.linears],
            "block_sensitivity": prof.block_sensitivity, "block_proxy": prof.block_proxy,
            "tensors_sha256": {f: tensors_sha256(work / "artifact" / f)
                               for f in (COMPRESSED, KEPT)},
            "metrics": done.metrics}


def measure_tiny(work: Path) -> dict:
    return measure(str(write_tiny_model(work / "tiny", layers=2)), work / "t")


def measure_all() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {"tiny": measure_tiny(Path(tmp)),
                "demo": measure(str(DEMO_MODEL), Path(tmp) / "d")}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(measure_all(), indent=1) + "\n")
