"""A GGUF whose metadata and tokenizer are exactly llama.cpp's converter's, and whose planned
2-D weights are bytes bitplan encoded itself, written as a stream.

The reference GGUF is the converter's own output for the model (compressor.artifact.
gguf_convert). `GGUFPlanWriter` copies every key-value of it, in its order, except the two that
llama-quantize rewrites — general.quantization_version (2, ggml's GGML_QNT_VERSION) and
general.file_type (the LLAMA_FTYPE of the type most weights are planned in), both moved to the
end as llama-quantize's gguf_set_val_u32 does — declares every tensor up front (planned ones
with their type and exact size, the others as in the reference), then takes the planned
tensors' packed rows in any order, writing in the declared order: the reference's order, the
vocabulary tensors (token_embd, output) moved last since the producer makes them last. Tensors
put ahead of their turn wait in memory (a caller delivering one transformer block at a time
keeps that to about a block); unplanned tensors are copied from the reference's memory map when
their turn comes.

Rows: bitplan encodes a Hugging Face weight row by row, in its own row order, and the converter
may reorder rows (llama-family converters permute q/k rows for llama.cpp's rotary layout).
`tensor_plan` finds, for each planned tensor, the permutation π with reference_row[i] ==
hf_row[π[i]] by matching the rows of the reference's data against the Hugging Face weight stored
the reference's way; anything but a row permutation (split, fused, scaled tensors) is refused.
The writer applies π to the rows it is given.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from compressor.checkpoint.tensor_reader import Checkpoint
from solver.gguf_types import gguf_tensor_bytes, gguf_type

QUANTIZATION_VERSION = 2      # ggml.h GGML_QNT_VERSION, written by llama-quantize
KV_QUANT_VERSION = "general.quantization_version"
KV_FILE_TYPE = "general.file_type"
_F = gguf.LlamaFileType
# bitplan's type → the llama-quantize ftype named after it ("mostly" that type; the k-quants'
# _M mixtures, as llama-quantize's Q4_K alias)
FILE_TYPES: dict[str, int] = {
    "F16": _F.MOSTLY_F16, "Q8_0": _F.MOSTLY_Q8_0, "Q6_K": _F.MOSTLY_Q6_K,
    "Q5_1": _F.MOSTLY_Q5_1, "Q5_K": _F.MOSTLY_Q5_K_M, "Q5_0": _F.MOSTLY_Q5_0,
    "Q4_1": _F.MOSTLY_Q4_1, "Q4_K": _F.MOSTLY_Q4_K_M, "Q4_0": _F.MOSTLY_Q4_0,
    "IQ4_NL": _F.MOSTLY_IQ4_NL, "Q3_K": _F.MOSTLY_Q3_K_M, "Q2_K": _F.MOSTLY_Q2_K}
_BLOCK = re.compile(r"^blk\.\d+\.")


# -- names and rows ----------------------------------------------------------------------------
def _arch(reader: gguf.GGUFReader) -> tuple[gguf.MODEL_ARCH, int]:
    name = reader.fields["general.architecture"].contents()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(name)
    if arch is None:
        raise ValueError(f"gguf-py does not know the reference's architecture {name!r}")
    field = reader.fields.get(f"{name}.block_count")
    return arch, int(field.contents()) if field is not None else 0


def gguf_name_map(reference_gguf: str | os.PathLike) -> gguf.TensorNameMap:
    """gguf-py's Hugging Face → GGUF tensor-name map for the reference's architecture."""
    return gguf.get_tensor_name_map(*_arch(gguf.GGUFReader(reference_gguf)))


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj` (or its `.weight`) → `blk.3.attn_q.weight`."""
    key = hf_name if hf_name.endswith(".weight") else hf_name + ".weight"
    return name_map.get_name(key, try_suffixes=(".weight", ".bias"))


def _rows_as_stored(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The float32 weight [rows, cols] stored as the reference stores it, bytes [rows, ·]."""
    if qtype == gguf.GGMLQuantizationType.F32:
        out = w
    elif qtype == gguf.GGMLQuantizationType.F16:
        out = w.astype(np.float16)
    else:
        out = gguf.quants.quantize(w, qtype)   # BF16 rounds as the converter does
    return np.ascontiguousarray(out).view(np.uint8).reshape(w.shape[0], -1)


def row_permutation(label: str, reference_rows: np.ndarray,
                    hf_rows: np.ndarray) -> np.ndarray | None:
    """π with reference_rows[i] == hf_rows[π[i]] (None when π is the identity), both byte rows
    [rows, row_bytes]; ValueError when the reference is no row permutation of the weight.
    Equal rows are matched in order, so a tensor kept in place gets the identity."""
    if reference_rows.shape != hf_rows.shape:
        raise ValueError(f"{label}: the converter stores it as {list(reference_rows.shape)} "
                         f"bytes where its rows make {list(hf_rows.shape)}: it is split, "
                         "fused or padded, not a row permutation of the weight")
    if np.array_equal(reference_rows, hf_rows):
        return None
    where: dict[bytes, list[int]] = {}
    for j in range(hf_rows.shape[0] - 1, -1, -1):      # reversed: pop() hands out in order
        where.setdefault(hashlib.blake2b(hf_rows[j].tobytes(), digest_size=16).digest(),
                         []).append(j)
    perm = np.empty(reference_rows.shape[0], dtype=np.int64)
    for i in range(reference_rows.shape[0]):
        got = where.get(hashlib.blake2b(reference_rows[i].tobytes(), digest_size=16).digest())
        if not got:
            raise ValueError(f"{label}: row {i} of the converter's tensor is no row of the "
                             "weight: the converter transforms it (scales, splits or fuses "
                             "it), not only reorders its rows")
        perm[i] = got.pop()
    if not np.array_equal(hf_rows[perm], reference_rows):
        raise ValueError(f"{label}: rows match by hash but not by value (hash collision)")
    return perm


def tensor_plan(model_dir: str | os.PathLike, reference_gguf: str | os.PathLike,
                names: list[str] | None = None) -> dict[str, tuple[str, np.ndarray | None]]:
    """{hf_name: (gguf_name, π or None)} for the Hugging Face linear weights `names` (module
    names such as `model.layers.3.self_attn.q_proj`, or their `.weight`; default: every 2-D
    weight of the checkpoint the reference holds). A tied `lm_head` (no weight of its own, no
    output.weight in the reference: llama.cpp reads token_embd) is left out."""
    reader = gguf.GGUFReader(reference_gguf)
    tmap = gguf.get_tensor_name_map(*_arch(reader))
    ref = {t.name: t for t in reader.tensors}
    ckpt = Checkpoint(Path(model_dir))
    if names is None:
        names = [n for n in ckpt.names() if n.endswith(".weight")
                 and len(ckpt.entry(n).shape) == 2 and gguf_name(tmap, n) in ref]
    plan: dict[str, tuple[str, np.ndarray | None]] = {}
    for hf in names:
        key = hf if hf.endswith(".weight") else hf + ".weight"
        g = gguf_name(tmap, key)
        if key not in ckpt:
            if g == "output.weight" and g not in ref:
                continue                              # tied to the embeddings
            raise ValueError(f"{hf}: the checkpoint in {model_dir} has no tensor {key}")
        if g is None or g not in ref:
            raise ValueError(f"{hf}: the reference GGUF has no tensor for it (gguf-py maps it "
                             f"to {g}); the converter renames or drops it")
        t = ref[g]
        w = ckpt.get(key)
        if w.dim() != 2:
            raise ValueError(f"{hf}: bitplan plans 2-D weights, {key} is {list(w.shape)}")
        stored = _rows_as_stored(w.float().numpy(), t.tensor_type)
        ref_rows = np.asarray(reader.data[t.data_offset:t.data_offset + t.n_bytes])
        rows = stored.shape[0]
        ref_rows = ref_rows.reshape(rows, -1) if ref_rows.size % max(rows, 1) == 0 \
            else ref_rows.reshape(1, -1)
        plan[hf] = (g, row_permutation(f"{hf} → {g}", ref_rows, stored))
    return plan


# -- the writer --------------------------------------------------------------------------------
def file_type(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> int:
    """The LLAMA_FTYPE of the type holding the most planned weights."""
    weights: Counter[str] = Counter()
    for name, t in types.items():
        weights[gguf_type(t).name] += int(np.prod(shapes[name]))
    top = max(sorted(weights), key=lambda t: weights[t])
    return int(FILE_TYPES[top])


def _kv_value(field) -> tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """A reader field as GGUFWriter.add_key_value arguments, strings kept as their bytes."""
    vt = field.types[0]
    if vt == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]), vt, None
    if vt != gguf.GGUFValueType.ARRAY:
        return field.parts[-1].tolist()[0], vt, None
    sub = field.types[-1]
    if len(field.types) != 2:
        raise ValueError(f"{field.name}: nested GGUF arrays are not supported")
    if sub == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], vt, sub
    return [v for i in field.data for v in field.parts[i].tolist()], vt, sub


class GGUFPlanWriter:
    """out_path = the reference GGUF with the tensors of `types` ({gguf_name: type name})
    stored in those types, their data given by `put`; `close()` finishes it (and `abort()`,
    or leaving a `with` block by an exception, removes it). `perms` ({gguf_name: π or None},
    tensor_plan's) says rows are put in Hugging Face order and are to be permuted."""

    def __init__(self, reference_gguf: str | os.PathLike, out_path: str | os.PathLike,
                 types: dict[str, str], perms: dict[str, np.ndarray | None] | None = None,
                 max_buffered_bytes: int | None = None) -> None:
        self.reader = gguf.GGUFReader(reference_gguf)
        self.path = Path(out_path)
        self._part = self.path.with_name(self.path.name + ".partial")
        self.perms = dict(perms or {})
        self.max_buffered_bytes = max_buffered_bytes
        ref = {t.name: t for t in self.reader.tensors}
        unknown = sorted(set(types) - set(ref))
        if unknown:
            raise ValueError(f"the reference GGUF has no tensor {unknown[0]} "
                             f"({len(unknown)} planned tensors not in it)")
        self._ref = ref
        self.types = {n: gguf_type(t).name for n, t in types.items()}
        shapes = {n: tuple(int(d) for d in reversed(ref[n].shape.tolist())) for n in types}
        for n, shape in shapes.items():
            if len(shape) != 2:
                raise ValueError(f"{n} is {list(shape)}: only 2-D tensors are planned")
        # row_bytes per planned tensor (gguf_tensor_bytes refuses a row its blocks don't fit)
        self._row_bytes = {n: gguf_tensor_bytes(self.types[n], 1, shapes[n][1]) for n in types}
        self._rows = {n: shapes[n][0] for n in types}
        in_blocks = [t.name for t in self.reader.tensors
                     if t.name not in types or _BLOCK.match(t.name)]
        self.order = in_blocks + [t.name for t in self.reader.tensors
                                  if t.name in types and not _BLOCK.match(t.name)]
        self._next = 0
        self._buffer: dict[str, np.ndarray] = {}
        self.buffered_bytes = self.peak_buffered_bytes = 0
        self._closed = False

        arch = self.reader.fields["general.architecture"].contents()
        self._w = gguf.GGUFWriter(self._part, arch)
        try:
            self._start(shapes)
        except BaseException:
            self.abort()
            raise

    def _start(self, shapes: dict[str, tuple[int, ...]]) -> None:
        w, ref = self._w, self._ref
        w.kv_data = [{}]                     # the reference's keys, in its order
        for field in self.reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (KV_QUANT_VERSION, KV_FILE_TYPE):
                continue
            w.add_key_value(field.name, *_kv_value(field))
        align = self.reader.fields.get("general.alignment")
        if align is not None:
            w.data_alignment = int(align.contents())
        w.add_uint32(KV_QUANT_VERSION, QUANTIZATION_VERSION)
        ftype = self.reader.fields.get(KV_FILE_TYPE)
        if self.types or ftype is not None:
            w.add_uint32(KV_FILE_TYPE, file_type(self.types, shapes) if self.types
                         else int(ftype.contents()))
        for name in self.order:
            t = ref[name]
            shape = [int(d) for d in reversed(t.shape.tolist())]
            if name in self.types:
                qt = gguf.GGMLQuantizationType(gguf_type(self.types[name]).type_id)
                nbytes = self._rows[name] * self._row_bytes[name]
            else:
                qt, nbytes = t.tensor_type, int(t.n_bytes)
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self._advance()

    def __enter__(self) -> GGUFPlanWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def missing(self) -> list[str]:
        """Planned tensors not put yet, in the declared order."""
        return [n for n in self.order[self._next:] if n in self.types and n not in self._buffer]

    def put(self, name: str, data: np.ndarray) -> None:
        """The packed rows of planned tensor `name`: uint8 [rows, row_bytes], in Hugging Face
        row order when the writer was given its π, else in the reference's."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if name not in self.types:
            raise ValueError(f"{name} is not a planned tensor of {self.path.name}")
        if name in self._buffer or name in self.order[:self._next]:
            raise ValueError(f"{name} was put twice")
        want = (self._rows[name], self._row_bytes[name])
        if data.dtype != np.uint8 or tuple(data.shape) != want:
            raise ValueError(f"{name} ({self.types[name]}) takes uint8 rows {list(want)}, got "
                             f"{data.dtype} {list(data.shape)}")
        perm = self.perms.get(name)
        data = np.ascontiguousarray(data[perm] if perm is not None else data)
        self._buffer[name] = data
        self.buffered_bytes += data.nbytes
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
        self._advance()
        if self.max_buffered_bytes is not None and self.buffered_bytes > self.max_buffered_bytes:
            waiting = next(n for n in self.order[self._next:] if n not in self._buffer)
            self.abort()
            raise ValueError(f"{self.buffered_bytes} bytes of tensors wait for {waiting}, over "
                             f"the {self.max_buffered_bytes}-byte bound: put tensors in "
                             "(about) the declared order, one block at a time")

    def _advance(self) -> None:
        """Writes every tensor whose turn has come and whose data is at hand."""
        while self._next < len(self.order):
            name = self.order[self._next]
            if name in self.types:
                if name not in self._buffer:
                    return
                data = self._buffer.pop(name)
                self.buffered_bytes -= data.nbytes
            else:
                t = self._ref[name]
                data = self.reader.data[t.data_offset:t.data_offset + t.n_bytes]
            self._w.write_tensor_data(data)
            self._next += 1

    def close(self) -> Path:
        if self._closed:
            return self.path
        missing = self.missing()
        if missing:
            self.abort()
            raise ValueError(f"{self.path.name}: planned tensor {missing[0]} was never put "
                             f"({len(missing)} missing)")
        self._w.close()
        self._closed = True
        self._part.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._w.close()
        self._part.unlink(missing_ok=True)


# -- the plan for llama-quantize ---------------------------------------------------------------
def tensor_type_file(types: dict[str, str]) -> str:
    """The plan as llama-quantize's --tensor-type-file: whitespace-separated `pattern=type`
    (tools/quantize/quantize.cpp parse_tensor_type), the pattern a regex searched in the tensor
    name, first match winning (src/llama-quant.cpp), so each name is escaped and anchored;
    the type ggml's name, matched case-insensitively, written lowercase. llama-quantize applies
    it when its ftype argument is a quantized one, e.g. `llama-quantize --tensor-type-file
    plan.txt reference.gguf out.gguf Q4_K_M`."""
    lines = []
    for name, t in types.items():
        if any(c.isspace() for c in name) or "=" in name:
            raise ValueError(f"tensor name {name!r} cannot be written in a tensor-type file")
        lines.append(f"^{re.escape(name)}$={gguf_type(t).name.lower()}")
    return "\n".join(lines) + ("\n" if lines else "")
