"""llama.cpp's own Hugging Face → GGUF converter, run on a model directory to make the reference
GGUF (bf16, or f32 for f32 models) whose metadata, tokenizer and non-planned tensors a bitplan
GGUF (compressor.artifact.gguf_export) copies.

The converter is `convert_hf_to_gguf.py` with its `conversion/` package and its own `gguf-py/`,
from the llama.cpp source inside the llama-cpp-python sdist that `make llama-cpp`
(scripts/build_llama_cpp.sh) unpacks into the cache; it runs as a subprocess of this venv's
python (it needs torch, transformers and sentencepiece). Which Hugging Face architectures it
knows is read from its sources (the `@ModelBase.register("...")` decorators and the
`TEXT_MODEL_MAP` dispatch table), without importing them, so a model it would refuse is
refused before any work.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"     # scripts/build_llama_cpp.sh VERSION (tested equal)
SRC_ENV = "BITPLAN_LLAMA_CPP_SRC"
# --outtype → the general.file_type (LLAMA_FTYPE) the converter writes for it
OUTTYPE_FTYPE = {"f32": 0, "f16": 1, "bf16": 32}


class LlamaCppNotFound(FileNotFoundError):
    """llama.cpp's source tree (or its tools) is not where bitplan looks for it."""


class ConversionError(RuntimeError):
    """llama.cpp's converter failed; the message is one line, its last error."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitplan" / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def llama_cpp_source() -> Path:
    """The vendored llama.cpp source tree ($BITPLAN_LLAMA_CPP_SRC, else the one `make
    llama-cpp` unpacks into the cache)."""
    env = os.environ.get(SRC_ENV)
    src = Path(env) if env else (_cache_root() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
                                 / "vendor" / "llama.cpp")
    needed = ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
    missing = [p for p in needed if not (src / p).is_file()]
    if missing:
        where = f"${SRC_ENV}={env}" if env else str(src)
        raise LlamaCppNotFound(f"llama.cpp's source tree is not at {where} (no {missing[0]}): "
                               f"run `make llama-cpp` (or set {SRC_ENV} to a llama.cpp "
                               "checkout)")
    return src


def llama_cpp_bin() -> Path | None:
    """The folder of llama.cpp's tools `make llama-cpp` builds (llama-quantize,
    llama-perplexity, …), or None when they are not built."""
    b = _cache_root() / "build" / "bin"
    return b if (b / "llama-perplexity").is_file() else None


# -- which architectures the converter knows ----------------------------------------------------
def _registered(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for d in node.decorator_list:
            if (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                    and d.func.attr == "register" and isinstance(d.func.value, ast.Name)
                    and d.func.value.id == "ModelBase"):
                names.update(a.value for a in d.args
                             if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def _dict_keys(tree: ast.AST, var: str) -> set[str] | None:
    for node in ast.walk(tree):
        target = (node.target if isinstance(node, ast.AnnAssign) else
                  node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else None)
        if (isinstance(target, ast.Name) and target.id == var
                and isinstance(node.value, ast.Dict)):
            return {k.value for k in node.value.keys
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return None


@lru_cache(maxsize=4)
def _known(src: Path) -> frozenset[str]:
    conv = src / "conversion"
    registered: set[str] = set()
    for f in sorted(conv.glob("*.py")):
        registered |= _registered(ast.parse(f.read_text(encoding="utf-8")))
    # the converter dispatches text models through TEXT_MODEL_MAP (conversion/__init__.py):
    # a registered name missing there is refused ("Model … is not supported")
    dispatch = _dict_keys(ast.parse((conv / "__init__.py").read_text(encoding="utf-8")),
                          "TEXT_MODEL_MAP")
    return frozenset(registered & dispatch if dispatch is not None else registered)


def known_architectures(src: Path | None = None) -> frozenset[str]:
    """The Hugging Face architectures (config.json `architectures`) the converter converts."""
    return _known(Path(src) if src is not None else llama_cpp_source())


def check_convertible(model_dir: str | os.PathLike, src: Path | None = None) -> str:
    """config.json's architecture, when llama.cpp's converter knows it; else ValueError."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg_path} cannot be read as JSON: {exc}") from None
    known = known_architectures(src)
    # as the converter's get_model_architecture: architectures[0], a text_config's overriding
    # it (the converter keeps the top-level one for a few multimodal models: either counts)
    top = (cfg.get("architectures") or [None])[0]
    text = ((cfg.get("text_config") or {}).get("architectures") or [None])[0]
    if top is None and "ssm_cfg" in cfg:
        top = cfg["ssm_cfg"].get("layer", "Mamba") + "ForCausalLM"
    for arch in (text, top):
        if arch in known:
            return arch
    arch = text or top
    if arch is None:
        raise ValueError(f"{cfg_path} names no architecture (no `architectures` list)")
    shown = difflib.get_close_matches(arch, sorted(known), n=6, cutoff=0.5) or sorted(known)[:6]
    raise ValueError(f"llama.cpp's converter does not know architecture {arch} (known: "
                     f"{', '.join(shown)}, … {len(known)} architectures)")


# -- running it -------------------------------------------------------------------------------
_ERROR_LINE = re.compile(r"^(ERROR:|CRITICAL:|[\w.]*(Error|Exception|Interrupt)\b:?)")


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


def _fresh(out: Path, model_dir: Path, outtype: str) -> bool:
    """Whether `out` is a finished conversion of `model_dir` (newer than all its files) to
    `outtype`."""
    if not out.is_file():
        return False
    newest = max((f.stat().st_mtime for f in model_dir.iterdir() if f.is_file()), default=0.0)
    if out.stat().st_mtime <= newest:
        return False
    try:
        import gguf
        field = gguf.GGUFReader(out).fields.get("general.file_type")
        return field is not None and field.contents() == OUTTYPE_FTYPE[outtype]
    except Exception:   # unreadable: convert again
        return False


def check_vocabulary(model_dir: str | os.PathLike) -> None:
    """The converter's vocabulary pass alone (`--vocab-only`, seconds): a tokenizer it cannot
    convert — a BPE pre-tokenizer it does not recognise — raises ConversionError before any
    profiling or compression, instead of after."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bitplan-vocab-") as tmp:
        convert_reference(model_dir, Path(tmp) / "vocab.gguf", vocab_only=True)


def convert_reference(model_dir: str | os.PathLike, out_path: str | os.PathLike,
                      outtype: str = "bf16",
                      progress: Callable[[str], None] | None = None, *,
                      vocab_only: bool = False) -> Path:
    """llama.cpp's converter run on `model_dir`, writing `out_path` (kept as it is when it is
    already a conversion of the model's current files). `progress` gets each line the
    converter logs. A failure raises ConversionError with the converter's last error line."""
    model_dir, out = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPE_FTYPE:
        raise ValueError(f"outtype {outtype!r}: the reference is one of {', '.join(OUTTYPE_FTYPE)}")
    src = llama_cpp_source()
    check_convertible(model_dir, src)
    if not vocab_only and _fresh(out, model_dir, outtype):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".partial")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [str(src / "gguf-py"),
                                                        os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
           "--outtype", outtype, "--outfile", str(part)] + (["--vocab-only"] if vocab_only else [])
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail.append(line)
            if progress is not None:
                progress(line)
        rc = proc.wait()
        if rc != 0 or not part.is_file():
            raise ConversionError(f"llama.cpp's converter failed on {model_dir} (exit {rc}): "
                                  f"{_last_error(list(tail))}")
        part.replace(out)
    finally:
        if proc.poll() is None:   # left early (progress raised, KeyboardInterrupt)
            proc.kill()
            proc.wait()
        part.unlink(missing_ok=True)
    return out
