"""Compressed-tensors plans measured many at a time, and the non-additivity guard on them.

`CTPlanEvaluator` is the StreamedPlanEvaluator (streamed_eval.py: one pass over the blocks, a
hidden-state stream per plan) with each (linear, option) encoded as the export writes it —
GPTQ into the scheme plus its LoRA (compressor.quant.ct_int) — and kept in memory as the codes,
scales and factors (a few bytes a weight), its Ŵ = q·s (fp16) + B·A swapped in while its block
is resident. `refine_ct` runs experiment.refine with it: what each block really adds to the
plan's KL on the tuning split rescales that block's α, the problem is re-solved at the same
budget (fused modules still tied), and the re-solved plan is kept only if it measures lower.
"""

from __future__ import annotations

import torch
from torch import Tensor

import solver
from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.loading import load_tokenizer
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.profile import ProfileConfig, calibration
from compressor.pipeline.profile_store import Profile
from compressor.quant.ct_int import CTEncoded, encode_ct
from compressor.research.experiment import refine
from compressor.research.streamed_eval import Key, StreamedPlanEvaluator
from solver.bytes import Option
from solver.ct_schemes import DENSE_BITS


class CTPlanEvaluator(StreamedPlanEvaluator):
    """StreamedPlanEvaluator over compressed-tensors options (module docstring)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._enc: dict[Key, CTEncoded | Tensor] = {}

    def is_cached(self, name: str, opt: Option) -> bool:
        return (name, opt) in self._enc

    def decomposed(self, name: str, opt: Option) -> Tensor:
        """Dense Ŵ [out, in] float32 of `name` at `opt` (encoded first, by a pass, if new)."""
        if not self.is_cached(name, opt):
            self.prepare([{name: opt}])
        enc = self._enc[(name, opt)]
        w = enc.float() if isinstance(enc, Tensor) else enc.w_hat()
        return w.to(self.sm.device)

    def w_hat(self, name: str, opt: Option) -> Tensor:
        return self.decomposed(name, opt)

    def _make(self, name: str, opt: Option, W: Tensor, H: Tensor) -> None:
        self._enc[(name, opt)] = (W.half() if opt.bits == DENSE_BITS else
                                  encode_ct(W, H, opt.bits, opt.group_size, opt.rank))
        self.decompositions += 1

    def _decompose_vocab(self, name: str, opt: Option, final: Tensor | None) -> None:
        raise ValueError(f"{name}: a compressed-tensors plan keeps the embedding and head dense")


@torch.no_grad()
def refine_ct(model_ref: str, prof: Profile, problem: solver.AllocationProblem,
              plan: solver.Plan, *, tune_seqs: int = 8, rounds: int = 1, device: str = "cpu",
              progress=None) -> dict:
    """experiment.refine on a compressed-tensors plan (module docstring): {"plan", the tuning
    KL before and after, the per-block α scales, evaluations}. Never reads the test split."""
    cfg = ProfileConfig.from_dict(prof.config)
    sm = StreamedModel(model_ref, device=device)
    tok = load_tokenizer(model_ref)
    tune = token_sequences(tok, Split.VALID, cfg.seq_len, n_seqs=tune_seqs)
    ev = CTPlanEvaluator(sm, calibration(tok, cfg), tune, tune_seqs=tune, progress=progress)
    return refine(ev, prof, problem, plan, rounds=rounds)
