"""`bitplan remote …`: the same work against a bitplan server over HTTP (service.client), with
BITPLAN_SERVER and BITPLAN_API_KEY (or --server/--key): models, plan (submit, progress until
done, the summary), jobs, compress, download (checksum verified), cancel, status, keys."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from service.client import BitplanClient, BitplanError, Job, Plan
from service.errors import UserError
from solver.budget import format_bytes
from solver.bytes import TARGETS, Option

BAR = 30


def register(sub) -> None:
    p = sub.add_parser("remote", help="talk to a bitplan server (BITPLAN_SERVER, BITPLAN_API_KEY)")
    p.add_argument("--server", default=None, help="default: $BITPLAN_SERVER")
    p.add_argument("--key", default=None, help="default: $BITPLAN_API_KEY")
    rs = p.add_subparsers(dest="remote_command", required=True, metavar="ACTION")

    rs.add_parser("models", help="models with profile status").set_defaults(func=cmd_models)
    q = rs.add_parser("plan", help="submit a plan, show its progress, print the summary")
    q.add_argument("model")
    q.add_argument("--budget", required=True, help='bytes, "850MiB", "3.25bpp" or "0.22x"')
    q.add_argument("--method", default="exact", choices=["exact", "cpsat", "greedy"])
    q.add_argument("--target", default="native", choices=list(TARGETS),
                   help="what serves the plan: native (bitplan's CALDERA format, the default), "
                        "gguf (a llama.cpp type per tensor, written as a GGUF file) or "
                        "compressed-tensors (a vLLM scheme per module)")
    q.add_argument("--constraints", type=Path, default=None, help="constraints JSON file")
    q.add_argument("--compress", action="store_true", help="compress once solved")
    q.add_argument("--no-wait", action="store_true", help="print the ids and return")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(func=cmd_plan)
    q = rs.add_parser("show", help="print a plan's summary")
    q.add_argument("plan_id")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_show)
    q = rs.add_parser("jobs", help="your team's jobs")
    q.add_argument("--status", default=None)
    q.set_defaults(func=cmd_jobs)
    q = rs.add_parser("compress", help="compress a solved plan; wait and print measured quality")
    q.add_argument("plan_id")
    q.add_argument("--no-wait", action="store_true")
    q.set_defaults(func=cmd_compress)
    q = rs.add_parser("download", help="download an artifact and verify its sha256")
    q.add_argument("artifact_id")
    q.add_argument("-o", "--out", type=Path, default=Path("."), help="directory (default .)")
    q.add_argument("--extract", action="store_true", help="unpack and check every file too")
    q.set_defaults(func=cmd_download)
    q = rs.add_parser("cancel", help="cancel a job (a running one stops at its next linear)")
    q.add_argument("job_id")
    q.set_defaults(func=cmd_cancel)
    rs.add_parser("status", help="queues and workers").set_defaults(func=cmd_status)


def client(args: argparse.Namespace) -> BitplanClient:
    try:
        return BitplanClient(args.server, args.key)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


class Progress:
    """A text progress bar on stderr: redrawn in place on a terminal, one line per change
    otherwise (logs, pipes)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last: tuple | None = None

    def __call__(self, job: Job) -> None:
        state = (job.status, job.stage, round(job.progress, 3))
        if state == self._last:
            return
        self._last = state
        filled = int(BAR * job.progress)
        line = (f"[{'#' * filled}{'.' * (BAR - filled)}] {100 * job.progress:5.1f}%  "
                f"{job.kind} {job.status}: {job.stage}")
        if self.tty:
            self.stream.write(f"\r{line:<90}" + ("\n" if job.done else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _call(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except BitplanError as exc:
        raise UserError(exc.message if exc.status else str(exc)) from exc


def cmd_models(args) -> int:
    with client(args) as bp:
        for m in _call(bp.models):
            f = _call(bp.feasibility, m.id)
            prof = f"profiled {m.profiled_at[:16]}" if m.profiled and m.profiled_at else \
                ("profiled" if m.profiled else "not profiled")
            print(f"{m.id}  {m.ref}  {m.num_linears} linears  {prof}  plans "
                  f"{format_bytes(f['min_bytes'])} – {format_bytes(f['max_bytes'])} "
                  f"({f['source']})")
    return 0


def print_plan(plan: Plan, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(asdict(plan), indent=1))
        return
    target = "" if plan.target == "native" else f"  target {plan.target}"
    print(f"plan {plan.id}  model {plan.model.get('ref')}  status {plan.status}{target}")
    if plan.total_bytes is None or not plan.budget_bytes:
        return
    print(f"budget {plan.budget} = {format_bytes(plan.budget_bytes)}; plan "
          f"{format_bytes(plan.total_bytes)} ({plan.total_bytes} B, "
          f"{100 * plan.total_bytes / plan.budget_bytes:.1f}% of the budget); "
          f"predicted KL {plan.predicted_error:.4g}")
    for n in plan.notes:
        print(f"note: {n}")
    gguf = any(li.get("gguf_type") or li.get("ct") for li in plan.linears)
    cols = f"{'type':>16}" if gguf else f"{'bits':>4} {'rank':>5} {'group':>5}"
    print(f"{'linear':<44} {cols} {'bytes':>10} {'pred. err':>10}")
    for li in plan.linears:
        err = li.get("predicted_error")
        opt = (f"{li.get('gguf_type') or Option.from_dict(li).label:>16}" if gguf else
               f"{li['bits']:>4} {li['rank']:>5} {li['group_size']:>5}")
        print(f"{li['name']:<44} {opt} "
              f"{li.get('bytes') or 0:>10} {err if err is None else format(err, '.3g'):>10}")


def _finished(job: Job) -> None:
    if job.status != "succeeded":
        msg = (job.error or {}).get("message") or job.status
        raise UserError(f"{job.kind} job {job.id} {job.status}: {msg}")


def cmd_plan(args) -> int:
    constraints = json.loads(args.constraints.read_text()) if args.constraints else None
    with client(args) as bp:
        acc = _call(bp.submit_plan, args.model, args.budget, constraints=constraints,
                    method=args.method, compress=args.compress, target=args.target)
        print(f"plan {acc.plan_id}  job {acc.job_id}", file=sys.stderr)
        if args.no_wait:
            print(json.dumps(asdict(acc)))
            return 0
        _finished(_call(bp.wait, acc.job_id, on_progress=Progress()))
        print_plan(_call(bp.plan, acc.plan_id), args.json)
    return 0


def cmd_show(args) -> int:
    with client(args) as bp:
        print_plan(_call(bp.plan, args.plan_id), args.json)
    return 0


def cmd_jobs(args) -> int:
    with client(args) as bp:
        for j in _call(bp.jobs, args.status):
            err = f"  {j.error['code']}: {j.error['message']}" if j.error else ""
            print(f"{j.id}  {j.kind:<8} {j.status:<9} {100 * j.progress:5.1f}%  "
                  f"attempts {j.attempts}  {j.stage}{err}")
    return 0


def cmd_compress(args) -> int:
    with client(args) as bp:
        art_id, job_id = _call(bp.compress, args.plan_id)
        print(f"artifact {art_id}  job {job_id}", file=sys.stderr)
        if args.no_wait:
            return 0
        _finished(_call(bp.wait, job_id, on_progress=Progress()))
        art = _call(bp.artifact, art_id)
        m = art.metrics
        print(f"artifact {art.id} ready: {art.tensor_bytes} tensor bytes (planned "
              f"{m.get('planned_bytes')}), sha256 {art.sha256}")
        print(f"KL {m.get('kl', float('nan')):.4g} (predicted {m.get('predicted_kl', float('nan')):.4g})"
              f"  ppl {m.get('ppl', float('nan')):.4g}  top-1 {m.get('top1', float('nan')):.4f}")
    return 0


def cmd_download(args) -> int:
    with client(args) as bp:
        got = _call(bp.download, args.artifact_id, args.out, extract=args.extract)
    checked = f", {got.files_checked} files checked" if got.files_checked else ""
    print(f"{got.path}  {got.bytes} bytes  sha256 {got.sha256} (verified{checked})")
    return 0


def cmd_cancel(args) -> int:
    with client(args) as bp:
        was = _call(bp.cancel, args.job_id)
    print(f"job {args.job_id} cancelled (was {was})")
    return 0


def cmd_status(args) -> int:
    with client(args) as bp:
        st = _call(bp.status)
    for q, c in st["queues"].items():
        print(f"queue {q}: {c['queued']} queued ({c['mine_queued']} yours), {c['running']} "
              f"running ({c['mine_running']} yours)")
    for w in st["workers"]:
        print(f"worker {w['id']} ({w['kind']}, queues {','.join(w['queues'])}) seen "
              f"{w['age_s']} s ago")
    if not st["workers"]:
        print(f"no worker seen in the last {st['window_s']:.0f} s")
    return 0
