"""Measure many plans on one model cheaply: decompose each (linear, option) pair once, cache
its dense Ŵ, and evaluate a plan by swapping the cached weights in.

The weights a plan is evaluated with are exactly the ones its artifact would hold (Ŵ = Q + L·R
dequantized), so measured KL and perplexity are real; only repeated work is avoided. Holds the
model and every Hessian in memory: used by the profile benchmark (predicted vs measured) and
the demo on small models; the experiment streams instead (streamed_eval.StreamedPlanEvaluator,
the same API in bounded memory).

`tune_seqs` (optional, e.g. the validation split) is a second evaluation set for decisions —
refining a plan on measured KL — so that the reported figures (on `eval_seqs`, the test split)
never come from the data the decisions were tuned on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from compressor.checkpoint.loading import vocab_modules
from compressor.pipeline.evaluate import EvalResult, evaluate, reference_logprobs
from compressor.pipeline.vocab import vocab_config
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import linear_weight
from solver.bytes import Option


class PlanEvaluator:
    def __init__(self, model: nn.Module, hessians: Mapping[str, Tensor], eval_seqs: Tensor,
                 config: DecompositionConfig | None = None, batch_size: int = 8,
                 cache_dir: Path | None = None, tune_seqs: Tensor | None = None) -> None:
        self.model = model
        self.hessians = hessians
        self.seqs = eval_seqs
        self.config = config or DecompositionConfig()
        self.batch_size = batch_size
        self.modules = dict(model.named_modules())
        # the embedding and head (compressor.pipeline.vocab): their weight, their rounding
        self.kinds = {li.name: li.kind for li in vocab_modules(model)}
        self.original = {n: self._weight(n).detach().clone() for n in hessians}
        self.reference = reference_logprobs(model, eval_seqs, batch_size)
        self.tune_seqs = tune_seqs
        self.tune_reference = (reference_logprobs(model, tune_seqs, batch_size)
                               if tune_seqs is not None else None)
        self.tune_evaluations = 0
        self.cache: dict[tuple[str, Option], Tensor] = {}
        self.errors: dict[tuple[str, Option], float] = {}
        self.decompositions = 0
        # optional on-disk cache shared by runs over the same profile (Ŵ + its error)
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def w_hat(self, name: str, opt: Option) -> Tensor:
        key = (name, opt)
        if key in self.cache:
            return self.cache[key]
        path = None
        if self.cache_dir is not None:
            tag = f"{opt.bits}-{opt.rank}-{opt.factor_bits}-{opt.group_size}-{int(opt.symmetric)}"
            path = self.cache_dir / f"{name}@{tag}.pt"
            if path.is_file():
                entry = torch.load(path)
                self.cache[key], self.errors[key] = entry["w_hat"], entry["rel_h_err"]
                return self.cache[key]
        kind = self.kinds.get(name)
        dec = decompose(self.original[name].float(), self.hessians[name], opt,
                        vocab_config(self.config, kind) if kind else self.config)
        self.cache[key] = dec.w_hat().to(self.original[name].dtype)
        self.errors[key] = dec.rel_h_err
        self.decompositions += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"w_hat": self.cache[key], "rel_h_err": dec.rel_h_err}, str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
        return self.cache[key]

    def _weight(self, name: str) -> Tensor:
        mod = self.modules[name]
        return mod.weight if name in self.kinds else linear_weight(mod)

    @torch.no_grad()
    def _set(self, name: str, w: Tensor) -> None:
        self._weight(name).copy_(w)   # a tied embedding's is the head's too

    @torch.no_grad()
    def measure(self, assignments: Mapping[str, Option], tune: bool = False) -> EvalResult:
        """Quality of the model with every assigned linear replaced by its Ŵ (others original),
        on the evaluation set, or on the tuning set when `tune`."""
        if tune and self.tune_seqs is None:
            raise ValueError("this evaluator has no tuning set")
        seqs, ref = (self.tune_seqs, self.tune_reference) if tune else (self.seqs, self.reference)
        try:
            for name, opt in assignments.items():
                self._set(name, self.w_hat(name, opt))
            self.tune_evaluations += int(tune)
            return evaluate(self.model, seqs, reference=ref, batch_size=self.batch_size)
        finally:
            for name in assignments:
                self._set(name, self.original[name])

    def baseline(self) -> EvalResult:
        return evaluate(self.model, self.seqs, reference=self.reference,
                        batch_size=self.batch_size)

    def measure_many(self, plans: Sequence[Mapping[str, Option]], tune: bool = False
                     ) -> list[EvalResult]:
        """`measure` of each plan in turn (StreamedPlanEvaluator's API: there one pass)."""
        return [self.measure(p, tune) for p in plans]
