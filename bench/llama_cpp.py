"""llama.cpp's own tools run from Python, and their numbers read back: llama-imatrix (an
importance matrix from calibration text), llama-quantize (a GGUF to a mix such as Q4_K_M, with an
imatrix and per-tensor overrides), llama-perplexity (reference logits, then KL divergence, top-1
agreement and perplexity of a quantized model against them) and llama-bench (decode tokens/s).

The binaries are the ones `make llama-cpp` (scripts/build_llama_cpp.sh) builds into
$XDG_CACHE_HOME/bitplan/llama.cpp/<version>/build/bin; BITPLAN_LLAMA_CPP_BIN names another
directory. Everything runs on the CPU with the thread count set explicitly (os.cpu_count()) and
a fixed seed where a tool takes one. Output formats are those of the llama.cpp inside
llama-cpp-python 0.3.36 (tools/perplexity/perplexity.cpp, tools/imatrix/imatrix.cpp,
tools/quantize/quantize.cpp, tools/llama-bench/llama-bench.cpp).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
ENV_BIN = "BITPLAN_LLAMA_CPP_BIN"
SEED = 0
_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_llama_cpp.sh"


def _version() -> str:
    """The llama-cpp-python version the build script pins (its VERSION= line)."""
    try:
        m = re.search(r"^VERSION=(\S+)", _SCRIPT.read_text(), re.M)
    except OSError:
        m = None
    return m.group(1) if m else "0.3.36"


def llama_cpp_bin_dir() -> Path:
    """Where the tools live: $BITPLAN_LLAMA_CPP_BIN, else the build script's cache directory."""
    if os.environ.get(ENV_BIN):
        return Path(os.environ[ENV_BIN]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "bitplan" / "llama.cpp" / _version() / "build" / "bin"


def llama_cpp_bin(tool: str) -> Path:
    """The path of one llama.cpp tool ("llama-quantize" or just "quantize"); FileNotFoundError
    saying how to build it when it is not there."""
    name = tool if tool.startswith("llama-") else f"llama-{tool}"
    path = llama_cpp_bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"${ENV_BIN}={os.environ[ENV_BIN]}" if os.environ.get(ENV_BIN) else str(path.parent)
        raise FileNotFoundError(f"{name} is not built (looked in {where}); `make llama-cpp` builds "
                                f"{', '.join(TOOLS)} (about 10 min on 2 cores, once per machine)")
    return path


def threads() -> int:
    return os.cpu_count() or 1


_ERRORISH = re.compile(r"error|failed|fail |invalid|unable|cannot|can't|not enough|need at least"
                       r"|tokenizes to only|does not|malformed|missing|mismatch|inconsistent"
                       r"|GGML_ASSERT|abort|terminate|what\(\)|exception|bad arguments",
                       re.I)


def _error_lines(lines: list[str], n: int = 6) -> list[str]:
    """The lines that say what went wrong: the error-looking ones (before any usage text a tool
    prints after a bad argument), else the last few non-empty lines."""
    text = [ln.rstrip() for ln in lines if ln.strip()]
    for i, ln in enumerate(text):
        if ln.lstrip().startswith("usage:") and i > 0:
            text = text[:i]
            break
    errs = [ln for ln in text if _ERRORISH.search(ln)]
    return (errs or text)[-n:]


def _exec(exe: Path, args: list[object], progress: Callable[[str], None] | None,
          timeout: float | None) -> tuple[int, str, str]:
    """One run: (exit status, stdout, stdout and stderr together in arrival order, whole lines
    kept together). `progress` gets each non-empty line, and also the pieces of a line that
    grows by "[N]ppl," marks (llama-perplexity and llama-imatrix print their chunks so)."""
    cmd = [str(exe), *map(str, args)]
    env = dict(os.environ, LLAMA_LOG_COLORS="off", NO_COLOR="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL)
    lock = threading.Lock()
    out: list[str] = []
    both: list[str] = []

    def pump(stream, mine: list[str] | None) -> None:
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        buf, shown = "", 0
        while chunk := os.read(stream.fileno(), 65536):
            buf += decode(chunk)
            *lines, buf = buf.split("\n")
            with lock:
                both.extend(ln + "\n" for ln in lines)
                if mine is not None:
                    mine.extend(ln + "\n" for ln in lines)
            if progress is not None:
                for i, ln in enumerate(lines):
                    if (piece := ln[shown:] if i == 0 else ln).strip():
                        progress(piece)
                if lines:
                    shown = 0
                if buf.endswith(",") and len(buf) > shown:
                    progress(buf[shown:])
                    shown = len(buf)
        if buf:
            with lock:
                both.append(buf)
                if mine is not None:
                    mine.append(buf)
        stream.close()

    readers = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, None), daemon=True)]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for r in readers:
            r.join(5)
        tail = "\n  ".join(_error_lines(both, 4))
        raise RuntimeError(f"{exe.name} timed out after {timeout} s; last output:\n  {tail}") \
            from None
    for r in readers:
        r.join()
    return rc, "".join(out), "".join(both)


def _run(tool: str, args: list[object], progress: Callable[[str], None] | None = None,
         timeout: float | None = None, complete: Callable[[str], bool] | None = None,
         tries: int = 3) -> tuple[str, str]:
    """Run a tool; (its stdout, stdout and stderr together). The tools that log through
    llama.cpp's common_log (imatrix, perplexity) write from a worker thread that exit() does not
    wait for (the logger is leaked on purpose, ggml-org/llama.cpp#22142), so a run's last lines
    are sometimes lost, more often the faster it ends. The runs are deterministic, so: a run whose
    output fails `complete` is run again (up to `tries` in all), and so is a failure that left
    no error line."""
    exe = llama_cpp_bin(tool)
    for attempt in range(1, tries + 1):
        rc, out, both = _exec(exe, args, progress, timeout)
        lines = both.splitlines()
        if rc != 0:
            if attempt < tries and not any(_ERRORISH.search(ln) for ln in lines):
                continue
            why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
            tail = _too_short(both) or "\n  ".join(_error_lines(lines)) or "(no output)"
            raise RuntimeError(f"{exe.name} failed ({why}):\n  {tail}")
        if complete is None or complete(both):
            break
    return out, both


def run_tool(tool: str, args: list[object], *, progress: Callable[[str], None] | None = None,
             timeout: float | None = None) -> str:
    """Run a llama.cpp tool with `args` (str() of each); its output (stdout and stderr as they
    came). Each non-empty line goes to `progress` as it arrives when given. A non-zero exit
    raises RuntimeError naming the tool with its last error lines (not the usage text)."""
    return _run(tool, args, progress, timeout)[1]


def _too_short(output: str) -> str | None:
    m = re.search(r"you need at least (\d+) tokens.*?context of (\d+).*?tokenizes to only "
                  r"(\d+) tokens", output, re.S)
    if m:
        need, ctx, have = m.groups()
        return (f"the text tokenizes to only {have} tokens; llama.cpp needs at least {need} "
                f"(2 x ctx {ctx}) — give a longer text or a smaller ctx")
    return None


def imatrix(model_gguf: str | Path, text_file: str | Path, out: str | Path, *, ctx: int = 512,
            chunks: int = -1, progress: Callable[[str], None] | None = None,
            timeout: float | None = None) -> Path:
    """An importance matrix of `model_gguf` on `text_file` with llama-imatrix, written to `out`
    (GGUF when `out` ends in .gguf — this version's default format — else the legacy .dat);
    `chunks` chunks of `ctx` tokens (-1: all the text has; at least 2·ctx tokens). Returns
    `out`."""
    out = Path(out)
    fmt = "gguf" if out.suffix == ".gguf" else "dat"
    try:
        text = run_tool("llama-imatrix", [
            "-m", model_gguf, "-f", text_file, "-o", out, "--output-format", fmt,
            "-c", ctx, "-b", ctx, "--chunks", chunks, "-t", threads(), "--seed", SEED,
            "--output-frequency", 1_000_000], progress=progress, timeout=timeout)
    except RuntimeError as e:
        if "tokens" in str(e):
            raise
        raise RuntimeError(f"{e}\n  (a text under 2·ctx = {2 * ctx} tokens fails this way)") \
            from None
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"llama-imatrix wrote no {out}:\n  " + "\n  ".join(
            _error_lines(text.splitlines())))
    return out


def quantize(src_gguf: str | Path, out_gguf: str | Path, mix: str, *,
             imatrix: str | Path | None = None, tensor_type_file: str | Path | None = None,
             tensor_types: dict[str, str] | None = None, allow_requantize: bool = False,
             progress: Callable[[str], None] | None = None,
             timeout: float | None = None) -> int:
    """Quantize `src_gguf` to `out_gguf` as `mix` ("Q4_K_M", "Q8_0", …) with llama-quantize;
    the output's size in bytes. `imatrix`: an importance matrix (.gguf or .dat);
    `tensor_type_file`: lines `pattern=type` (this version's --tensor-type-file; the pattern is
    a regex searched in the tensor name, e.g. `blk\\.3\\.ffn_down=q6_k`); `tensor_types`: the same
    as --tensor-type options."""
    args: list[object] = []
    if allow_requantize:
        args.append("--allow-requantize")
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    if tensor_type_file is not None:
        args += ["--tensor-type-file", tensor_type_file]
    for pattern, kind in (tensor_types or {}).items():
        args += ["--tensor-type", f"{pattern}={kind}"]
    out_gguf = Path(out_gguf)
    run_tool("llama-quantize", [*args, src_gguf, out_gguf, mix, threads()], progress=progress,
             timeout=timeout)
    if not out_gguf.is_file():
        raise RuntimeError(f"llama-quantize exited 0 but wrote no {out_gguf}")
    return out_gguf.stat().st_size


def quantized_types(gguf_path: str | Path) -> dict[str, str]:
    """Each tensor's stored type ("Q4_K", "F32", …) by name, read with gguf.GGUFReader."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_path)).tensors}


def gguf_vocab_size(gguf_path: str | Path) -> int | None:
    """The number of tokens in a GGUF's tokenizer.ggml.tokens (None when it has none)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.tokens")
    return None if field is None else len(field.data)


def logits_header(path: str | Path) -> dict[str, int]:
    """What a --kl-divergence-base file holds: ctx, vocab, chunks, tokens (= ctx·chunks). The
    file is b"_logits_", u32 n_ctx, i32 n_vocab, i32 n_chunk, the tokens, then per chunk the
    last ctx-1-ctx/2 positions' log-probs (perplexity.cpp). Only 12 bytes: the text was too
    short (llama-perplexity writes the first two fields before tokenizing)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:8] != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity logits file")
    if len(head) < 20:
        raise ValueError(f"{path} holds no logits (the text was shorter than 2·ctx tokens?)")
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
    return {"ctx": n_ctx, "vocab": n_vocab, "chunks": n_chunk, "tokens": n_ctx * n_chunk}


def kld_base(ref_gguf: str | Path, text_file: str | Path, logits_out: str | Path, *,
             ctx: int = 512, chunks: int = -1, progress: Callable[[str], None] | None = None,
             timeout: float | None = None) -> dict[str, float]:
    """Save the reference model's log-probabilities over `text_file` to `logits_out`
    (llama-perplexity --kl-divergence-base), for kld() to compare against: `chunks` chunks of
    `ctx` tokens (-1: all the text has; at least 2·ctx tokens). Returns logits_header()'s
    numbers, and the reference's own perplexity `ppl` when llama.cpp's log delivered it."""
    logits_out = Path(logits_out)
    text = run_tool("llama-perplexity", [
        "-m", ref_gguf, "-f", text_file, "--kl-divergence-base", logits_out, "-c", ctx,
        "-b", ctx, "--chunks", chunks, "-t", threads(), "--seed", SEED],
        progress=progress, timeout=timeout)
    size = logits_out.stat().st_size if logits_out.is_file() else 0
    if size == 12:
        why = _too_short(text) or (f"the text tokenizes to fewer than 2·ctx = {2 * ctx} tokens "
                                   f"llama.cpp needs — give a longer text or a smaller ctx")
        raise RuntimeError(f"llama-perplexity: {why}")
    if size < 20:
        raise RuntimeError(f"llama-perplexity wrote no logits to {logits_out}:\n  " + "\n  ".join(
            _error_lines(text.splitlines())))
    res: dict[str, float] = dict(logits_header(logits_out))
    if m := re.search(rf"Final estimate: PPL = ({_NUM})", text):
        res["ppl"] = float(m.group(1))
    return res


_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf)"
# the summary llama-perplexity prints once it has scored >= 100 tokens: key -> (line, scale)
_SUMMARY = {
    "ppl": (r"Mean PPL\(Q\)\s*:", 1.0), "ppl_base": (r"Mean PPL\(base\)\s*:", 1.0),
    "ln_ppl_ratio": (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:", 1.0),
    "ppl_ratio": (r"Mean PPL\(Q\)/PPL\(base\)\s*:", 1.0),
    "kld": (r"Mean\s+KLD:", 1.0), "kld_max": (r"Maximum KLD:", 1.0),
    "kld_p999": (r"99\.9%\s+KLD:", 1.0), "kld_p99": (r"99\.0%\s+KLD:", 1.0),
    "kld_p95": (r"95\.0%\s+KLD:", 1.0), "kld_median": (r"Median\s+KLD:", 1.0),
    "dp_mean": (r"Mean\s+Δp:", 0.01), "dp_rms": (r"RMS Δp\s*:", 0.01),
    "same_top": (r"Same top p:", 0.01),
}
# a per-chunk row (running totals): chunk, PPL ± u, ln ratio ± u, KLD ± u, Δp RMS ± u %, top ± u %
_ROW = re.compile(rf"^\s*(\d+)\s+({_NUM})\s*±\s*{_NUM}\s+({_NUM})\s*±\s*{_NUM}\s+({_NUM})\s*±\s*"
                  rf"{_NUM}\s+({_NUM})\s*±\s*{_NUM}\s*%\s+({_NUM})\s*±\s*{_NUM}\s*%\s*$", re.M)


def parse_kld(output: str) -> dict[str, float]:
    """The numbers of a `llama-perplexity --kl-divergence` run. From the summary when printed
    (only once >= 100 tokens are scored): ppl, ppl_base, ln_ppl_ratio, ppl_ratio, kld (mean KL
    divergence, nats per token), kld_max, kld_p999, kld_p99, kld_p95, kld_median, dp_mean,
    dp_rms, same_top (the last three fractions, not %: same_top is the top-1 agreement "Same top
    p"); else from the last per-chunk row (running means): ppl, ln_ppl_ratio, kld, dp_rms,
    same_top. Also `chunks`: the last row's chunk number. ppl_base is of the stored reference
    log-probs, which llama.cpp clips 16 nats below each position's top logit, so it reads low for
    a very peaked reference; kld_base()'s ppl is the true one."""
    res: dict[str, float] = {}
    for key, (label, scale) in _SUMMARY.items():
        m = re.search(rf"^{label}\s*({_NUM})", output, re.M)
        if m:
            res[key] = float(m.group(1)) * scale
    rows = _ROW.findall(output)
    if rows:
        chunk, ppl, ratio, kl, rms, top = rows[-1]
        res["chunks"] = int(chunk)
        for key, val, scale in (("ppl", ppl, 1), ("ln_ppl_ratio", ratio, 1), ("kld", kl, 1),
                                ("dp_rms", rms, 0.01), ("same_top", top, 0.01)):
            res.setdefault(key, float(val) * scale)
    if "kld" not in res:
        raise RuntimeError("llama-perplexity printed no KL divergence:\n  " + "\n  ".join(
            _error_lines(output.splitlines())))
    return res


def kld(model_gguf: str | Path, logits_file: str | Path, *, ctx: int | None = None,
        chunks: int | None = None, progress: Callable[[str], None] | None = None,
        timeout: float | None = None) -> dict[str, float]:
    """KL divergence of `model_gguf` from the reference logits kld_base() saved:
    llama-perplexity --kl-divergence, over all the file's chunks with the file's ctx (`ctx`,
    `chunks`: what the caller expects the file to hold — a mismatch is a ValueError). Returns
    parse_kld()'s dict: at least kld (mean), ppl (this model's perplexity on the text), same_top
    (top-1 agreement), and `complete` (the summary and every chunk row arrived)."""
    head = logits_header(logits_file)
    for name, want in (("ctx", ctx), ("chunks", chunks)):
        if want is not None and want != head[name]:
            raise ValueError(f"{logits_file} holds {head[name]} for {name}, not {want}: "
                             f"llama-perplexity --kl-divergence scores the file as it is")
    if (vocab := gguf_vocab_size(model_gguf)) not in (None, head["vocab"]):
        raise ValueError(f"{model_gguf} has {vocab} tokens, the reference of {logits_file} "
                         f"{head['vocab']}: KL divergence needs the same vocabulary")
    n_ctx, n_chunk = head["ctx"], head["chunks"]
    summary = n_chunk * (n_ctx - 1 - n_ctx // 2) >= 100   # it prints statistics from 100 tokens

    def complete(text: str) -> bool:
        rows = _ROW.findall(text)
        return bool(rows) and int(rows[-1][0]) == n_chunk and (
            not summary or re.search(r"^Same top p:", text, re.M) is not None)

    _, text = _run("llama-perplexity", [
        "-m", model_gguf, "--kl-divergence-base", logits_file, "--kl-divergence", "-c", n_ctx,
        "-b", n_ctx, "-t", threads(), "--seed", SEED], progress, timeout, complete)
    for bad in ("does not look like a file containing log-probabilities", "inconsistent vocab",
                "Increase it with -c", "failed reading"):
        if bad in text:
            raise RuntimeError("llama-perplexity --kl-divergence: " + "\n  ".join(
                _error_lines(text.splitlines())))
    res = parse_kld(text)
    res["complete"] = complete(text)
    return res


def bench_decode(model_gguf: str | Path, *, n_gen: int = 32, reps: int = 3,
                 progress: Callable[[str], None] | None = None,
                 timeout: float | None = None) -> float:
    """Decode speed in tokens/s: llama-bench -p 0 -n n_gen -r reps -o json, threads = cpu
    count, no GPU layers; the median of its per-rep rates (samples_ts), not their mean
    (avg_ts), which one slow rep (thread pool start-up) can swing."""
    out, both = _run("llama-bench", [
        "-m", model_gguf, "-p", 0, "-n", n_gen, "-r", reps, "-t", threads(), "-ngl", 0,
        "-o", "json"], progress, timeout)
    start = out.find("[")
    try:
        tests = json.loads(out[start:]) if start >= 0 else []
    except json.JSONDecodeError as e:
        raise RuntimeError(f"llama-bench printed no JSON ({e}):\n  " + "\n  ".join(
            _error_lines(both.splitlines()))) from None
    gen = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if not gen:
        raise RuntimeError(f"llama-bench reported no generation test: {out[:500]}")
    samples = sorted(gen[-1].get("samples_ts") or [gen[-1]["avg_ts"]])
    return float(samples[len(samples) // 2])  # the median rep: a first rep can be far slower
