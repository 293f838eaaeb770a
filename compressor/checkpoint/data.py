"""The committed text corpus and seeded loaders that cut it into fixed-length token sequences.

The corpus is Python source (code + docstrings) from the CPython standard library, split by file
into train / valid / test. It is PSF-licensed and redistributable (see data/LICENSE-PSF.txt).
"""

from __future__ import annotations

import copy
from enum import Enum
from pathlib import Path

import torch

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class Split(str, Enum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


def load_text(split: Split | str, data_dir: Path | None = None) -> str:
    split = Split(split)
    path = (data_dir or DEFAULT_DATA_DIR) / f"{split.value}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"corpus split {split.value!r} not found at {path}")
    return path.read_text(encoding="utf-8")


def plain_backend(tokenizer):
    """The fast tokenizer's backend without truncation or padding, or None (a slow tokenizer).

    A saved tokenizer.json may enable both, and the backend honours them in encode_batch (every
    file cut to max_length, padding ids added), so the corpus would depend on them. The caller's
    tokenizer is left as it is: we disable them on a copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return backend
    plain = copy.deepcopy(backend)
    plain.no_truncation()
    plain.no_padding()
    return plain


def _encode(tokenizer, text: str, backend=None) -> list[int]:
    """Encode in chunks (per file) so fast tokenizers never see one giant string; `backend` is
    plain_backend(tokenizer), passed in by callers that encode many chunks."""
    docs = text.split("\n# file: ")
    backend = backend if backend is not None else plain_backend(tokenizer)
    if backend is not None:  # fast path: batch-encode without length warnings
        encoded = backend.encode_batch(docs, add_special_tokens=False)
        return [i for enc in encoded for i in enc.ids]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return ids


def token_sequences(
    tokenizer,
    split: Split | str,
    seq_len: int,
    n_seqs: int | None = None,
    seed: int | None = None,
    data_dir: Path | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from a split, shape [N, seq_len].

    The split's files are concatenated — in file order when `seed` is None (evaluation: fixed
    sequences, fixed order), in a seeded random order otherwise (calibration) — and only as many
    files are tokenized as the `n_seqs` windows need, so a small request never encodes the
    whole split.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    docs = load_text(split, data_dir).split("\n# file: ")
    order = list(range(len(docs)))
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(docs), generator=gen).tolist()
    need = None if n_seqs is None else n_seqs * seq_len
    ids: list[int] = []
    backend = plain_backend(tokenizer)
    chunk = 16
    for i in range(0, len(order), chunk):
        batch = "\n# file: ".join(docs[j] for j in order[i:i + chunk])
        ids.extend(_encode(tokenizer, batch, backend))
        if need is not None and len(ids) >= need:
            break
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"split {Split(split).value!r} is shorter than one sequence of {seq_len}")
    if n_seqs is not None:
        n_windows = min(n_windows, n_seqs)
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
