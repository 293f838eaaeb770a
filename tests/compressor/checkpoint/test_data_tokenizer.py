"""The corpus is encoded the same whatever truncation/padding a saved tokenizer.json sets, and
loading a model prints no transformers deprecation warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.loading import load_tokenizer
from tests.helpers.paths import DEMO_MODEL, REPO


def _with_truncation_and_padding(src: Path, dst: Path) -> Path:
    """The demo model's tokenizer, saved with truncation (16 tokens) and padding enabled, as
    many real checkpoints ship theirs."""
    import shutil

    from tokenizers import Tokenizer

    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.enable_truncation(max_length=16)
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=32)
    tok.save(str(dst / "tokenizer.json"))
    return dst


def test_saved_truncation_and_padding_do_not_change_the_corpus(tmp_path):
    model = _with_truncation_and_padding(DEMO_MODEL, tmp_path / "m")
    plain, saved = load_tokenizer(DEMO_MODEL), load_tokenizer(model)
    assert saved.backend_tokenizer.truncation is not None   # the setting survived loading
    want = token_sequences(plain, Split.TEST, 255, n_seqs=16)
    got = token_sequences(saved, Split.TEST, 255, n_seqs=16)
    assert got.shape == want.shape == (16, 255)
    assert got.equal(want)
    calib = token_sequences(saved, Split.TRAIN, 64, n_seqs=8, seed=3)
    assert calib.equal(token_sequences(plain, Split.TRAIN, 64, n_seqs=8, seed=3))
    # the caller's tokenizer keeps its own settings
    assert saved.backend_tokenizer.truncation["max_length"] == 16
    assert saved.backend_tokenizer.padding is not None


def test_loading_prints_no_torch_dtype_deprecation():
    code = ("from compressor.checkpoint.loading import inventory, load_model, load_tokenizer\n"
            f"m = {str(DEMO_MODEL)!r}\n"
            "load_model(m); inventory(m); load_tokenizer(m)\n"
            "from compressor.research.demo_model import DemoConfig\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert "deprecated" not in proc.stderr.lower(), proc.stderr
