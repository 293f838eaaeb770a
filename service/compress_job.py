"""The compression job: execute a solved plan, save the artifact, measure it, and store
predicted and measured side by side.

Layer-resumable: every finished linear is written to the job's work directory
(<data_dir>/artifacts/<artifact id>.partial/) before the next starts; a redelivered job loads
those and decomposes only the rest. The artifact itself is written atomically by save_artifact.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from service.db.models import Artifact, Job, ModelRow, PlanRow, utcnow
from service.db.profile_store import DbProfileStore
from service.jobs.state import JobFailed

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return name.replace("/", "_")


def run(ctx):
    from safetensors.torch import load_file, save_file

    import solver
    from compressor.archive import archive_sha256
    from compressor.artifact import load_compressed, save_artifact
    from compressor.compress import compress_model
    from compressor.decompose import Decomposed
    from compressor.evaluate import eval_sequences, evaluate, reference_logprobs
    from compressor.hessian import collect_hessians
    from compressor.loading import load_model, load_tokenizer
    from compressor.modules import replace_linear
    from compressor.planning import predicted_kl
    from compressor.profile import ProfileConfig, calibration
    from service.jobs.runner import StageResult

    with ctx.db.session() as s:
        job = s.get(Job, ctx.job_id)
        plan_row = s.get(PlanRow, job.plan_id) if job.plan_id else None
        model_row = s.get(ModelRow, plan_row.model_id) if plan_row else None
        art = s.get(Artifact, job.artifact_id) if job.artifact_id else None
        if plan_row is None or model_row is None or art is None or not plan_row.result:
            raise JobFailed("compress job needs a solved plan and its artifact row",
                            "invalid_job")
        plan = solver.Plan.from_dict(plan_row.result)
        profile_id, model_path, art_id = plan_row.profile_id, model_row.path, art.id
    profile = DbProfileStore(ctx.db).get_by_id(profile_id)
    if profile is None:
        raise JobFailed("the plan's profile is missing", "profile_missing")
    settings = ctx.settings
    cfg = ProfileConfig.from_dict(profile.config)
    root = Path(settings.data_dir) / "artifacts"
    work = root / f"{art_id}.partial"
    (work / "linears").mkdir(parents=True, exist_ok=True)

    ctx.report("compress/load", 0.02)
    model = load_model(model_path, settings.trust_remote_code, device=settings.device)
    tok = load_tokenizer(model_path, settings.trust_remote_code)
    seqs = eval_sequences(tok, settings.eval_seq_len, settings.eval_seqs)
    ref = reference_logprobs(model, seqs)
    done: dict[str, Decomposed] = {}
    for meta in sorted((work / "linears").glob("*.json")):
        tensors = load_file(str(meta)[: -len(".json")] + ".safetensors")
        rec = json.loads(meta.read_text())
        done[rec["name"]] = Decomposed.from_tensors(tensors, rec["record"])
    # Hessians of the linears still to do come from the *original* model, as in a run that was
    # never interrupted: collected before the finished linears are swapped back in
    todo = [n for n in plan.assignments if n not in done]
    hessians = collect_hessians(model, calibration(tok, cfg), todo) if todo else {}
    for name, dec in done.items():
        replace_linear(model, name, dec)
    if done:
        log.info("compress job %s resumes: %d linears already done", ctx.job_id, len(done))
    total = len(plan.assignments)

    def on_linear(name: str, dec: Decomposed) -> None:
        # names contain dots, so suffixes are appended, never substituted (with_suffix)
        base = str(work / "linears" / _safe(name))
        save_file(dec.tensors(), base + ".safetensors.tmp")
        Path(base + ".safetensors.tmp").replace(base + ".safetensors")
        # atomically too: a worker killed mid-write must not leave a torn record to resume from
        Path(base + ".json.tmp").write_text(json.dumps({"name": name, "record": dec.record()}))
        Path(base + ".json.tmp").replace(base + ".json")
        done[name] = dec
        ctx.report("compress/linears", 0.05 + 0.8 * len(done) / total)

    compress_model(model, plan.assignments, calibration(tok, cfg), config=cfg.decomposition,
                   hessians=hessians, on_linear=on_linear, skip=set(done))
    ctx.report("compress/save", 0.86)
    out = root / art_id
    if out.exists():
        shutil.rmtree(out)
    manifest = save_artifact(model, tok, done, out, plan=plan.to_dict(), source_ref=model_path)
    ctx.report("evaluate", 0.9)
    compressed, _ = load_compressed(out, device=settings.device)
    res = evaluate(compressed, seqs, reference=ref)
    metrics = {"ppl": res.ppl, "kl": res.kl, "top1": res.top1, "eval_tokens": res.tokens,
               "predicted_kl": predicted_kl(profile, plan.assignments),
               "planned_bytes": plan.total_bytes, "artifact_tensor_bytes": manifest.total_bytes}
    # the digest of the one download (the artifact's deterministic tar), not of one file;
    # read before the transaction opens, so no session is held while GBs are hashed
    digest, _ = archive_sha256(out)
    with ctx.db.session() as s:
        row = s.get(Artifact, art_id)
        row.status = "ready"
        row.path = str(out)
        row.bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        row.tensor_bytes = manifest.total_bytes
        row.sha256 = digest
        row.metrics = metrics
        row.finished_at = utcnow()
    shutil.rmtree(work, ignore_errors=True)
    return StageResult(result=metrics | {"artifact_id": art_id},
                       links={"artifact_id": art_id, "plan_id": plan_row.id})
