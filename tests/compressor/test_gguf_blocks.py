"""Our GGUF block encoders (compressor.quant.gguf_blocks / gguf_kquants) against gguf-py: its
dequantizer reads our bytes back to exactly our w_hat, its round-to-nearest quantizers are no
better than ours, the error orders as the bit widths do, and H makes the rounding better in
tr(ΔHΔᵀ)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from compressor.quant.gguf_blocks import (
    CODECS,
    KVALUES_IQ4NL,
    _nearest,
    _sweep,
    decode_gguf,
    encode_gguf,
)
from compressor.quant.hessian import damp_hessian
from compressor.quant.rounding import inverse_cholesky_upper
from solver.gguf_types import GGUF_TYPES, gguf_tensor_bytes

torch.set_num_threads(1)

TYPES = list(GGUF_TYPES)
SMALL = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]
KQUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def _w(rows: int, cols: int, seed: int = 0, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if outliers:
        W[0, 5] = 40.0
        W[3, 300] = -25.0
        W[5, 256:288] = 0.0                       # an all-zero block
        W[6, :] = 0.75                            # a constant row
        W[7, 100:400] *= 1e-3                     # tiny blocks
    return W


def _heavy_h(n: int, seed: int = 1) -> torch.Tensor:
    """XᵀX/N of correlated inputs with a few heavy columns."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n ** 0.5
    X = torch.randn(4 * n, n, generator=g) @ mix
    X[:, ::37] *= 8.0
    return X.T @ X / X.shape[0]


def _gguf(data: np.ndarray, t: str, rows: int, cols: int) -> np.ndarray:
    return dequantize(data, gguf.GGMLQuantizationType[t]).reshape(rows, cols)


def _rel(W, W_hat) -> float:
    return ((W_hat - W).norm() / W.norm()).item()


def _herr(W, W_hat, H) -> float:
    D = (W_hat - W).double()
    return torch.einsum("ij,jk,ik->", D, H.double(), D).item()


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("outliers", [False, True])
def test_gguf_py_reads_our_bytes_as_our_w_hat(t, outliers):
    W = _w(8, 512, outliers=outliers)
    enc = encode_gguf(W, t)
    assert enc.type_name == t
    assert enc.data.dtype == np.uint8 and enc.data.shape[0] == 8
    assert enc.data.nbytes == gguf_tensor_bytes(t, 8, 512)
    assert enc.w_hat.dtype == torch.float32 and enc.w_hat.shape == (8, 512)
    np.testing.assert_array_equal(_gguf(enc.data, t, 8, 512), enc.w_hat.numpy())
    assert torch.equal(decode_gguf(enc.data, t, 512), enc.w_hat)
    assert _rel(W, enc.w_hat) < 0.35


@pytest.mark.parametrize("t", ["Q4_0", "IQ4_NL", "Q5_1", "Q4_K", "Q3_K", "Q6_K"])
def test_gguf_py_reads_hessian_rounded_bytes_too(t):
    W = _w(16, 512, seed=3, outliers=True).double()          # float64 input, too
    H = _heavy_h(512)
    enc = encode_gguf(W, t, H)
    np.testing.assert_array_equal(_gguf(enc.data, t, 16, 512), enc.w_hat.numpy())
    assert torch.equal(decode_gguf(enc.data, t, 512), enc.w_hat)


@pytest.mark.parametrize("t", TYPES)
def test_our_decoder_reads_any_valid_bytes_as_gguf_py_does(t):
    """Random bytes (with finite fp16 scales): our decoder alone against gguf-py's, which
    checks every bit position of the layout, not just those our encoder happens to use."""
    spec = GGUF_TYPES[t]
    cols = 512
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=(4, cols // spec.block, spec.block_bytes), dtype=np.uint8)
    offsets = {"F16": range(0, 2, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,)}
    for o in offsets.get(t, (0, 2) if t in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else (0,)):
        vals = rng.uniform(-2, 2, size=data.shape[:2]).astype(np.float16)
        data[:, :, o:o + 2] = vals.view(np.uint8).reshape(*data.shape[:2], 2)
    data = data.reshape(4, -1)
    if t == "F16":
        data = rng.uniform(-2, 2, size=(4, cols)).astype(np.float16).view(np.uint8)
    np.testing.assert_array_equal(decode_gguf(data, t, cols).numpy(), _gguf(data, t, 4, cols))


def test_a_gguf_file_with_our_bytes_reads_back(tmp_path):
    path = tmp_path / "t.gguf"
    W = _w(4, 512)
    encs = {t: encode_gguf(W, t) for t in ("Q4_0", "Q4_K", "IQ4_NL", "F16")}
    writer = gguf.GGUFWriter(str(path), "llama")
    for t, enc in encs.items():
        writer.add_tensor(f"w.{t}", enc.data, raw_dtype=gguf.GGMLQuantizationType[t])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        t = tensor.name.split(".", 1)[1]
        assert tensor.tensor_type == gguf.GGMLQuantizationType[t]
        assert list(tensor.shape) == [512, 4]                 # ggml's ne = [cols, rows]
        got = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(4, 512)
        np.testing.assert_array_equal(got, encs[t].w_hat.numpy())


@pytest.mark.parametrize("t", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
def test_no_worse_than_gguf_py_round_to_nearest(t):
    W = _w(64, 1024, seed=2)
    ref = quantize(W.numpy(), gguf.GGMLQuantizationType[t])
    ref_err = _rel(W, torch.from_numpy(_gguf(ref, t, 64, 1024)))
    ours = _rel(W, encode_gguf(W, t).w_hat)
    assert ours <= ref_err * 1.005, (ours, ref_err)


@pytest.mark.parametrize("t", list(CODECS))
def test_codes_are_nearest_on_the_stored_grid(t):
    """Without feedback every element decodes to the grid point of its STORED (fp16, and
    k-quants' integer sub-scale) parameters nearest to it: the codes were rounded against
    what the decoder reads, not against the float scales searched. (Q8_0's bytes are thus
    not gguf-py's: its scale is absmax/127 and its codes are rounded against the fp32 one.)"""
    W = _w(8, 512, seed=4, outliers=True)
    codec = CODECS[t]
    data = torch.from_numpy(encode_gguf(W, t).data).reshape(8, 512 // codec.block, -1)
    codes, s, o = codec.unpack(data)
    x = W.reshape(8, -1, codec.block).unsqueeze(-1)
    grid = codec.expand(s).unsqueeze(-1) * codec.levels + codec.expand(o).unsqueeze(-1)
    err = (x - grid).abs()
    chosen = err.gather(-1, codes.unsqueeze(-1))
    assert (chosen <= err.amin(-1, keepdim=True) + 1e-6 * x.abs() + 1e-12).all()


def test_error_orders_with_the_bits():
    W = _w(128, 1024, seed=5)
    e = {t: _rel(W, encode_gguf(W, t).w_hat) for t in TYPES}
    for hi, lo in zip(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"],
                      ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"], strict=True):
        assert e[hi] > 1.3 * e[lo], (hi, lo, e)
    assert e["Q4_0"] > e["Q4_1"] and e["Q5_0"] > e["Q5_1"] > e["Q6_K"]
    assert e["IQ4_NL"] < 0.97 * e["Q4_0"]
    assert e["Q4_0"] > 1.5 * e["Q5_0"] and e["Q5_0"] > 4 * e["Q8_0"]
    assert 0.05 < e["Q4_0"] < 0.1 and e["Q2_K"] < 0.3


@pytest.mark.parametrize("t", ["Q4_0", "Q4_K", "IQ4_NL", "Q5_1", "Q3_K", "Q6_K"])
def test_hessian_aware_rounding_lowers_the_proxy_loss(t):
    W = _w(64, 512, seed=6)
    H = _heavy_h(512)
    plain = _herr(W, encode_gguf(W, t).w_hat, H)
    weighted = _herr(W, encode_gguf(W, t, H, error_feedback=False).w_hat, H)
    gptq = _herr(W, encode_gguf(W, t, H).w_hat, H)
    assert gptq < 0.9 * plain, (gptq, plain)
    assert gptq < 0.9 * weighted, (gptq, weighted)
    assert weighted < plain                     # the weighted scale search alone helps too


def test_importance_weights_protect_heavy_columns():
    """A diagonal H (no correlations, so no feedback to speak of): the heavy columns' own
    error shrinks when the search weighs them."""
    W = _w(64, 512, seed=8)
    h = torch.ones(512)
    h[::16] = 100.0
    H = torch.diag(h)
    plain = encode_gguf(W, "Q4_0").w_hat
    weighted = encode_gguf(W, "Q4_0", H, error_feedback=False).w_hat
    heavy = slice(0, None, 16)
    assert (weighted - W)[:, heavy].norm() < 0.8 * (plain - W)[:, heavy].norm()
    assert _herr(W, weighted, H) < 0.9 * _herr(W, plain, H)


@pytest.mark.parametrize("t", list(CODECS))
def test_the_sweep_without_feedback_is_nearest_rounding(t):
    """U = I feeds nothing forward: the column sweep's per-block fits and codes must then be
    the vectorised path's exactly (checks the sweep's block / sub-block bookkeeping)."""
    W = _w(8, 512, seed=9, outliers=True)
    codec = CODECS[t]
    w = torch.rand(512 // codec.block, codec.block, generator=torch.Generator().manual_seed(1))
    c1, f1 = _sweep(W.clone(), torch.eye(512), codec, w + 0.5)
    c2, f2 = _nearest(W.clone(), codec, w + 0.5)
    assert torch.equal(c1, c2)
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)


def _textbook_gptq(W, H, codec):
    """GPTQ as the paper writes it: one column at a time, every later column updated at
    once, each block fitted from its fully updated columns."""
    W = W.clone()
    U = inverse_cholesky_upper(H)
    w = H.diagonal().reshape(-1, codec.block)
    codes = torch.empty(W.shape, dtype=torch.int64)
    for j in range(W.shape[1]):
        if j % codec.block == 0:
            _, s, o = codec.fit(W[:, j:j + codec.block].unsqueeze(1), w[j // codec.block:][:1])
            s, o = codec.expand(s)[:, 0].double(), codec.expand(o)[:, 0].double()
        k = j % codec.block
        c = codec.round(W[:, j], s[:, k], o[:, k])
        codes[:, j] = c
        e = (W[:, j] - (s[:, k] * codec.levels.double()[c] + o[:, k])) / U[j, j]
        W[:, j + 1:] -= e[:, None] * U[j, j + 1:][None, :]
    return codes


@pytest.mark.parametrize("t", ["Q4_0", "IQ4_NL", "Q4_1", "Q4_K", "Q6_K"])
def test_lazy_batches_match_the_textbook_loop(t):
    W = _w(8, 512, seed=10).double()
    H = damp_hessian(_heavy_h(512).double())
    codec = CODECS[t]
    codes, _ = _sweep(W, inverse_cholesky_upper(H), codec, H.diagonal().reshape(-1, codec.block))
    ref = _textbook_gptq(W, H, codec)
    assert (codes.reshape(8, 512) == ref).float().mean() > 0.999


@pytest.mark.parametrize("t,cols", [("Q4_K", 576), ("Q2_K", 100), ("Q4_0", 48),
                                    ("IQ4_NL", 40), ("Q6_K", 32)])
def test_a_row_that_is_not_whole_blocks_is_refused(t, cols):
    with pytest.raises(ValueError, match=rf"{t}.*{cols}"):
        encode_gguf(torch.randn(2, cols), t)
    with pytest.raises(ValueError, match=rf"{t}.*{cols}"):
        decode_gguf(np.zeros((2, 18), np.uint8), t, cols)


def test_unknown_type_and_bad_hessian_are_refused():
    with pytest.raises(ValueError, match="Q7_0"):
        encode_gguf(torch.randn(2, 64), "Q7_0")
    with pytest.raises(ValueError, match="H must be"):
        encode_gguf(torch.randn(2, 64), "Q4_0", torch.eye(32))


def test_576_wide_rows_and_an_empty_tensor():
    W = _w(4, 576, seed=11)
    for t in SMALL:
        enc = encode_gguf(W, t, _heavy_h(576))
        np.testing.assert_array_equal(_gguf(enc.data, t, 4, 576), enc.w_hat.numpy())
    empty = encode_gguf(torch.zeros(0, 64), "Q4_0")
    assert empty.data.shape == (0, 36) and empty.w_hat.shape == (0, 64)


def test_iq4_nl_grid_is_ggmls():
    assert KVALUES_IQ4NL == gguf.quants.IQ4_NL.kvalues
    assert {t for t in GGUF_TYPES if t != "F16"} == set(CODECS)
