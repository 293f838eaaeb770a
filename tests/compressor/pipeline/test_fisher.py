"""Fisher sensitivity (compressor.pipeline.fisher): the streamed sampled-label estimate of each
tensor's Fisher trace against the exact trace enumerated over every label of a tiny model,
for block linears, an untied head, an embedding and a tied tensor, and for GPT-2's Conv1D
layout; and a profile made with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, jacrev

from compressor.checkpoint.loading import discover, load_model
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.fisher import FisherProbes
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.quant.hessian import linear_weight
from tests.helpers.models import WORD_VOCAB, save_model, tiny_lm, write_word_tokenizer

P, T, DRAWS = 3, 12, 48
VOCAB = 40
# weights of std 0.2: a random model's output distribution then varies with the input, so
# each tensor's Fisher trace is well away from zero
INIT = 0.2


def _model(family: str, tie: bool):
    extra = {"initializer_range": INIT}
    if family == "gpt2":
        return tiny_lm("gpt2", 0, vocab=VOCAB, hidden=32, **extra).double()
    return tiny_lm(family, 0, vocab=VOCAB, hidden=32, intermediate=40, tie=tie, **extra
                   ).double()


def exact_traces(model, ids: torch.Tensor, names: list[str]) -> dict[str, float]:
    """tr F per tensor, F = mean over positions of Σ_y p_t(y) g g ᵀ, g = ∇ log p_t(y): from the
    full Jacobian of the logits (every label of every position), in float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = {n: f"{n}.weight" for n in names}

    def logits(sub: dict) -> torch.Tensor:
        return functional_call(model, params | sub, (ids,)).logits

    with torch.no_grad():
        p = torch.softmax(model(ids).logits, -1)                       # [P, T, V]
    jac = jacrev(logits)({w: params[w] for w in wanted.values()})
    out = {}
    for name, w in wanted.items():
        J = jac[w].reshape(*p.shape, -1)                                    # [P, T, V, |W|]
        g = J - (p.unsqueeze(-1) * J).sum(2, keepdim=True)             # ∇ log p_t(y)
        out[name] = float((p * g.pow(2).sum(-1)).sum() / (P * T))
    return out


def _fisher_alphas(path, ids, kinds: dict[str, str]) -> tuple[dict, dict]:
    """FisherProbes driven as the profile sweep drives it, every H = I (so α = ½ tr F ·
    ‖W‖² / (m n)); also each tensor's ‖W‖² / (m n)."""
    sm = StreamedModel(str(path))
    probes = FisherProbes(sm, ids, DRAWS, seed=0)
    ratio = {}
    for name, kind in kinds.items():
        if kind in ("embedding", "tied"):
            W = sm.vocab_weight(name)
            probes.vocab(name, kind, W, torch.eye(W.shape[1]))
            ratio[name] = float(W.pow(2).mean())
    for j in range(sm.num_blocks):
        with sm.block(j) as blk:
            prefix = sm.block_name(j) + "."
            names = [n for n, k in kinds.items() if k == "linear" and n.startswith(prefix)]
            for n in names:
                W = linear_weight(blk.get_submodule(n[len(prefix):])).float()
                probes.scale(n, W, torch.eye(W.shape[1]))
                ratio[n] = float(W.pow(2).mean())
            probes.block(j, blk, names)
    for name, kind in kinds.items():
        if kind == "head":
            W = sm.vocab_weight(name)
            probes.vocab(name, kind, W, torch.eye(W.shape[1]))
            ratio[name] = float(W.pow(2).mean())
    return probes.finish(), ratio


@pytest.mark.parametrize("family,tie", [("qwen2", False), ("qwen2", True), ("gpt2", True)])
def test_fisher_alpha_matches_the_exact_fisher_trace(tmp_path, family, tie) -> None:
    model = _model(family, tie)
    save_model(model.float(), tmp_path / "m")
    ids = torch.randint(0, VOCAB, (P, T), generator=torch.Generator().manual_seed(1))
    inv = discover(load_model(tmp_path / "m"))
    kinds = {li.name: li.kind if li.is_vocab else "linear" for li in inv.linears}
    assert ("tied" in kinds.values()) == tie
    alpha, ratio = _fisher_alphas(tmp_path / "m", ids, kinds)
    exact = exact_traces(model, ids, list(kinds))
    assert set(alpha) == set(kinds)
    errs = {n: alpha[n] / (0.5 * exact[n] * ratio[n]) - 1 for n in kinds}
    # DRAWS × P × T = 1728 sampled scores per tensor: the estimate's spread is a few percent;
    # a lost factor (½, the tied cross term, a transposed Gram) is 30 % or more
    assert max(abs(e) for e in errs.values()) < 0.12, errs
    assert abs(sum(errs.values()) / len(errs)) < 0.05, errs


def test_fisher_profile_records_every_alpha_and_keeps_the_probe_key(tmp_path) -> None:
    model = tiny_lm("qwen2", 0, vocab=WORD_VOCAB, hidden=32, intermediate=40,
                    initializer_range=INIT)
    save_model(model, tmp_path / "m")
    write_word_tokenizer(tmp_path / "m")
    base = dict(calib_seqs=4, seq_len=16, q_bits=(2, 3, 4), anchors=(), extra_groups=())
    probe = ProfileConfig(**base, sensitivity="probe")
    fisher = ProfileConfig(**base, fisher_seqs=4, fisher_samples=4)
    assert fisher.sensitivity == "fisher"                # the default
    assert "sensitivity" not in probe.to_dict()          # the probe profiles' keys unchanged
    assert ProfileConfig.from_dict(fisher.to_dict()) == fisher
    assert ProfileConfig.from_dict(probe.to_dict()).sensitivity == "probe"
    store = FileProfileStore(tmp_path / "p")
    a = {lp.name: lp.alpha for lp in run_profile(str(tmp_path / "m"), store,
                                                 config=probe).linears}
    prof = run_profile(str(tmp_path / "m"), store, config=fisher)
    b = {lp.name: lp.alpha for lp in prof.linears}
    assert set(a) == set(b) and all(math.isfinite(v) and v > 0 for v in b.values())
    # the two estimate the same quantity: at this model's scale they agree on the ordering
    names = sorted(a)
    ra = torch.tensor([a[n] for n in names]).argsort().argsort().double()
    rb = torch.tensor([b[n] for n in names]).argsort().argsort().double()
    assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.8
    with pytest.raises(ValueError, match="sensitivity"):
        ProfileConfig(**base, sensitivity="hutchinson")
