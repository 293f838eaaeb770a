"""Measure many plans on a model streamed block by block (compressor.checkpoint.stream), in
bounded memory: plan_eval.PlanEvaluator's API without holding the model or any Hessian whole.

One pass reads each block once and carries through the resident block j
- one hidden-state stream per plan, with that plan's Ŵ of block j swapped in (dense while the
  block is resident: pipeline.evaluate.swapped), each started from its plan's embedding table;
- the reference stream through the original block, until its final hidden states are known
  (then kept, one [N, T, D] tensor per evaluation set, and never carried again);
- the calibration stream through the original block while a (linear, option) the pass needs is
  not cached yet: H = XᵀX / tokens of block j's linears (HessianHooks, as profile and compress
  collect them: the original model's activations, CALDERA's setting), the missing
  decompositions made and written to the cache, H freed with the block.
At the end each plan's final states meet the head (its compressed head or tied tensor as
`head=`): perplexity, KL(original ‖ plan) and top-1 agreement, the quantities and the
aggregation of `stream_evaluate` (and of `evaluate` on a model held whole).

Memory: one block with its Hessians, one plan's dense Ŵ of that block at a time, one
[vocab, D] table or head at a time, and the streams; plans per pass are capped so that their
streams fit `stream_bytes` (more plans take more passes, never more memory).

The cache holds each (linear, option)'s Decomposed — packed codes, the plan's bytes, not a
dense Ŵ — with its record (rel_h_err, output cosine) in execute.DirCompressStore's format:
<cache_dir>/decomposed/<option>/linears/<name>.*; a second evaluator over the same profile
decomposes nothing it finds there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from compressor.checkpoint.headers import block_index
from compressor.checkpoint.loading import vocab_modules
from compressor.checkpoint.stream import BATCH, StreamedModel
from compressor.pipeline.evaluate import EvalResult, head_result, swapped
from compressor.pipeline.execute import DirCompressStore
from compressor.pipeline.vocab import check_vocab_option, vocab_config, vocab_hessian
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import Decomposed, DecompositionConfig
from compressor.quant.hessian import HessianHooks, is_linear, linear_weight
from solver.bytes import Option

STREAM_BYTES = 2 * 2**30   # the plans' streams of one pass (the reference's and calibration's aside)
MAX_PLANS = 32             # plans per pass at most, however narrow the model

Plan = Mapping[str, Option]
Key = tuple[str, Option]


def option_tag(opt: Option) -> str:
    """A directory name per option (every field of it: a different option, a different Ŵ)."""
    return (f"b{opt.bits}-r{opt.rank}-f{opt.factor_bits}-g{opt.group_size}"
            f"-{'sym' if opt.symmetric else 'asym'}")


class StreamedPlanEvaluator:
    """`measure`, `measure_many`, `baseline`, `w_hat` and `errors` as PlanEvaluator's, on
    `sm` streamed from its checkpoint. `calib`: the calibration ids [N, T] the Hessians come
    from (the profile's); `cache_dir`: where decompositions are kept across runs (None: a
    temporary directory, removed with the evaluator); `progress(stage, fraction)`: called per
    block of every pass with the fraction of that pass done."""

    def __init__(self, sm: StreamedModel, calib: Tensor, eval_seqs: Tensor,
                 config: DecompositionConfig | None = None, batch_size: int = BATCH,
                 cache_dir: Path | None = None, tune_seqs: Tensor | None = None,
                 progress: Callable[[str, float], None] | None = None,
                 stream_bytes: int = STREAM_BYTES) -> None:
        self.sm, self.calib = sm, calib
        self.seqs, self.tune_seqs = eval_seqs, tune_seqs
        self.config = config or DecompositionConfig()
        self.batch_size = batch_size
        self.progress = progress or (lambda stage, frac: None)
        self.vocab = {li.name: li for li in vocab_modules(sm.model)}
        self.linears = {n for n, m in sm.model.named_modules()
                        if is_linear(m) and block_index(n) is not None}
        self._tmp = tempfile.TemporaryDirectory(prefix="bitplan-plans-") if cache_dir is None \
            else None
        self.cache_dir = Path(cache_dir if cache_dir is not None else self._tmp.name)
        self._stores: dict[Option, DirCompressStore] = {}
        self._cached: dict[Option, set[str]] = {}
        self.errors: dict[Key, float] = {}     # rel_h_err of every decomposition read or made
        self.cosines: dict[Key, float] = {}    # its output cosine (Decomposed.output_cosine)
        self.decompositions = self.tune_evaluations = self.passes = 0
        self._final: dict[bool, Tensor] = {}   # the reference's final states, per set (tune?)
        n = max(len(eval_seqs), len(tune_seqs) if tune_seqs is not None else 0)
        width = sm.ckpt.entry(sm.embed_name).shape[1]
        stream = n * eval_seqs.shape[1] * width * sm.dtype.itemsize
        self.max_plans = max(1, min(MAX_PLANS, stream_bytes // max(stream, 1)))

    # -- the cache ------------------------------------------------------------------------------
    def _store(self, opt: Option) -> DirCompressStore:
        if opt not in self._stores:
            self._stores[opt] = DirCompressStore(self.cache_dir / "decomposed" / option_tag(opt))
            self._cached[opt] = self._stores[opt].names()
        return self._stores[opt]

    def is_cached(self, name: str, opt: Option) -> bool:
        self._store(opt)
        return name in self._cached[opt]

    def _put(self, name: str, opt: Option, dec: Decomposed) -> None:
        self._store(opt).put(name, dec.to("cpu"))
        self._cached[opt].add(name)
        self.errors[(name, opt)], self.cosines[(name, opt)] = dec.rel_h_err, dec.output_cosine
        self.decompositions += 1

    def decomposed(self, name: str, opt: Option) -> Decomposed:
        """The cached decomposition of `name` at `opt` (made first, by a pass, when missing)."""
        if not self.is_cached(name, opt):
            self.prepare([{name: opt}])
        dec = self._store(opt).get(name)
        self.errors[(name, opt)], self.cosines[(name, opt)] = dec.rel_h_err, dec.output_cosine
        return dec.to(self.sm.device)

    def w_hat(self, name: str, opt: Option) -> Tensor:
        """Dense Ŵ [out, in] float32 of `name` at `opt`: the weights its artifact would hold."""
        return self.decomposed(name, opt).w_hat()

    def prepare(self, plans: Sequence[Plan]) -> None:
        """Decompose (and cache) every (linear, option) of `plans` not cached yet, measuring
        nothing: one pass over the blocks that need a Hessian."""
        self._pass([], False, {(n, o) for p in plans for n, o in p.items()})

    # -- measuring ------------------------------------------------------------------------------
    def measure(self, assignments: Plan, tune: bool = False) -> EvalResult:
        """Quality of the model with every assigned linear replaced by its Ŵ (others original),
        on the evaluation set, or on the tuning set when `tune`: one streamed pass."""
        return self.measure_many([assignments], tune)[0]

    def measure_many(self, plans: Sequence[Plan], tune: bool = False) -> list[EvalResult]:
        """`measure` of every plan, `max_plans` of them per streamed pass."""
        if tune and self.tune_seqs is None:
            raise ValueError("this evaluator has no tuning set")
        out: list[EvalResult] = []
        for i in range(0, len(plans), self.max_plans):
            chunk = [dict(p) for p in plans[i:i + self.max_plans]]
            out += self._pass(chunk, tune, {(n, o) for p in chunk for n, o in p.items()})
        self.tune_evaluations += len(plans) if tune else 0
        return out

    def baseline(self) -> EvalResult:
        """The original model against itself (KL ≈ 0, top-1 1): a pass only while the
        reference's final states are not known yet."""
        return self.measure({})

    @torch.no_grad()
    def _pass(self, plans: list[dict[str, Option]], tune: bool, need: set[Key]
              ) -> list[EvalResult]:
        sm, bs, L = self.sm, self.batch_size, self.sm.num_blocks
        seqs = self.tune_seqs if tune else self.seqs
        self._check(need)
        missing = sorted((k for k in need if not self.is_cached(*k)), key=_order)
        kinds = {n: li.kind for n, li in self.vocab.items()}
        for name, opt in missing:   # lookups first: H = I, and the plans' streams start there
            if kinds.get(name) in ("embedding", "tied"):
                self._decompose_vocab(name, opt, None)
        heads = [k for k in missing if kinds.get(k[0]) == "head"]
        if not plans and not missing:
            return []
        blocks = {block_index(n) for n, _ in missing if n not in kinds}
        # an untied head's Hessian reads the final calibration states: then every block
        last_calib = L - 1 if heads else max(blocks, default=-1)
        X = self._embed(self.calib) if last_calib >= 0 else None
        ref = self._embed(seqs) if plans and tune not in self._final else None
        hs = [self._embed(seqs, self._vocab_w(p, ("embedding", "tied"))) if p else None
              for p in plans]     # an empty plan is the reference itself
        streams = ref is not None or any(h is not None for h in hs)
        last = L - 1 if streams else last_calib   # else: only as far as a Hessian is needed
        stage = f"{'tune' if tune else 'measure'} {len(plans)} plans" if plans else "decompose"
        self.passes += last >= 0
        for j in range(last + 1):
            with sm.block(j) as blk:
                if X is not None and j <= last_calib:
                    X = self._calibrate(blk, j, X, [k for k in missing if k[0] not in kinds
                                                    and block_index(k[0]) == j])
                if ref is not None:
                    ref = sm.run(blk, ref, bs)
                self._run_plans(blk, j, plans, hs)
            if X is not None and j == last_calib and not heads:
                X = None
            self.progress(stage, (j + 1) / (last + 1))
        for name, opt in heads:
            self._decompose_vocab(name, opt, X)
        del X
        if ref is not None:
            self._final[tune] = ref
        out = []
        for k, p in enumerate(plans):
            h, hs[k] = hs[k], None
            out.append(head_result(sm, seqs, self._final[tune] if h is None else h,
                                   self._final[tune], self._vocab_w(p, ("head", "tied")), bs))
        return out

    def _run_plans(self, blk: nn.Module, j: int, plans: list[dict[str, Option]],
                   hs: list[Tensor | None]) -> None:
        """Each plan's stream (hs[k], in place) through resident block j with the plan's Ŵ of
        the block swapped in; a decomposition several plans share is read once."""
        memo: dict[Key, Decomposed] = {}
        for k, p in enumerate(plans):
            if hs[k] is None:
                continue
            mine = {}
            for n, o in p.items():
                if n not in self.vocab and block_index(n) == j:
                    if (n, o) not in memo:
                        memo[(n, o)] = self.decomposed(n, o)
                    mine[n] = memo[(n, o)]
            with swapped(self.sm, j, blk, mine):
                hs[k] = self.sm.run(blk, hs[k], self.batch_size)

    def _calibrate(self, blk: nn.Module, j: int, X: Tensor, todo: list[Key]) -> Tensor:
        """Carry the calibration stream through original block j, decomposing `todo` (block j's
        missing (linear, option) pairs) from the Hessians it gives; returns the block's output."""
        prefix = self.sm.block_name(j) + "."
        names = sorted({n for n, _ in todo})
        hooks = HessianHooks(blk, names, prefix=prefix) if names else None
        X = self.sm.run(blk, X, self.batch_size)
        H = hooks.result(self.calib.numel()) if hooks else {}
        for name, opt in todo:
            W = linear_weight(blk.get_submodule(name[len(prefix):])).detach().float()
            self._make(name, opt, W, H[name])
            del W
        return X

    def _make(self, name: str, opt: Option, W: Tensor, H: Tensor) -> None:
        """Compress one linear at `opt` from its Hessian and keep it (the cache)."""
        self._put(name, opt, decompose(W, H, opt, self.config))

    def _decompose_vocab(self, name: str, opt: Option, final: Tensor | None) -> None:
        li = self.vocab[name]
        check_vocab_option(name, li.kind, opt)
        self._put(name, opt, decompose(self.sm.vocab_weight(name),
                                       vocab_hessian(self.sm, li, final), opt,
                                       vocab_config(self.config, li.kind)))

    def _vocab_w(self, plan: Plan, kinds: tuple[str, ...]) -> Tensor | None:
        """The plan's dense compressed table (kinds embedding/tied) or head (head/tied)."""
        for name, opt in plan.items():
            if name in self.vocab and self.vocab[name].kind in kinds:
                return self.w_hat(name, opt)
        return None

    def _embed(self, seqs: Tensor, table: Tensor | None = None) -> Tensor:
        return torch.cat([self.sm.inputs(seqs[i:i + self.batch_size], table)[0]
                          for i in range(0, len(seqs), self.batch_size)])

    def _check(self, keys: set[Key]) -> None:
        unknown = sorted({n for n, _ in keys if n not in self.linears and n not in self.vocab})
        if unknown:
            raise KeyError(f"assignments name modules the model does not have: {unknown[:5]}")


def _order(key: Key) -> tuple:
    """Missing decompositions in a fixed order (block, name, option): reruns match."""
    name, o = key
    return (block_index(name) if block_index(name) is not None else -1, name,
            (o.bits, o.rank, o.factor_bits, o.group_size, o.symmetric))
