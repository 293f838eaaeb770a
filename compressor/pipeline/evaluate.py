"""Model quality on the test split: perplexity, and against a reference model the mean token
KL(reference ‖ model) and top-1 agreement. Deterministic: fixed sequences in a fixed order.

Perplexity alone can mislead (the research note's Goodhart caveat), so KL and top-1 agreement
to the uncompressed model are always reported beside it when a reference is given.
`stream_evaluate` computes the same figures block by block from the checkpoint (what
execute_plan uses); `evaluate` runs a model held in memory.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.headers import block_index
from compressor.checkpoint.loading import vocab_modules
from compressor.checkpoint.stream import StreamedModel
from compressor.quant.decomposed import Decomposed
from compressor.runtime.modules import Runtime, replace_linear


@dataclass
class EvalResult:
    ppl: float
    nll: float
    tokens: int
    sequences: int
    seq_len: int
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def eval_sequences(tokenizer, seq_len: int = 256, n_seqs: int | None = 96) -> torch.Tensor:
    return token_sequences(tokenizer, Split.TEST, seq_len, n_seqs=n_seqs, seed=None)


@torch.no_grad()
def reference_logprobs(model, seqs: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Log-probs of a reference model per batch, computed once and reused against many models."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=seqs[i:i + batch_size].to(device)).logits.float(), -1)
            .cpu() for i in range(0, len(seqs), batch_size)]


@torch.no_grad()
def evaluate(
    model,
    seqs: torch.Tensor,
    reference: list[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    on_batch: Callable[[float], None] | None = None,
) -> EvalResult:
    """Perplexity of `model` on `seqs` [N, T]; KL and top-1 vs `reference` log-probs if given."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    starts = range(0, len(seqs), batch_size)
    for k, i in enumerate(tqdm(starts, desc="eval", disable=not progress, leave=False)):
        batch = seqs[i:i + batch_size].to(device)
        logp = F.log_softmax(model(input_ids=batch).logits.float(), -1).cpu()
        targets = batch[:, 1:].cpu()
        pred = logp[:, :-1]
        nll_sum += -pred.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if reference is not None:
            ref = reference[k]
            # KL(ref ‖ model) per position, averaged over every position of every sequence.
            kl_sum += (ref.exp() * (ref - logp)).sum(-1).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        if on_batch:
            on_batch((k + 1) / len(starts))
    positions = seqs.numel()
    nll = nll_sum / count
    return EvalResult(
        ppl=math.exp(nll), nll=nll, tokens=count, sequences=len(seqs), seq_len=seqs.shape[1],
        kl=kl_sum / positions if reference is not None else None,
        top1=agree / positions if reference is not None else None,
    )


@torch.no_grad()
def stream_evaluate(
    sm: StreamedModel,
    seqs: torch.Tensor,
    decomposed: Mapping[str, Decomposed | Tensor] | None = None,
    batch_size: int = 8,
    on_block: Callable[[float], None] | None = None,
) -> EvalResult:
    """`evaluate` streamed block by block (compressor.checkpoint.stream): perplexity of the model read
    from `sm`'s checkpoint with the `decomposed` linears swapped in, and — when there are any —
    KL(original ‖ compressed) and top-1 agreement against the original, whose stream is carried
    through the same resident block. Each block is read once; the head runs in vocab chunks.
    `decomposed` is read one block's linears at a time (it may load them lazily:
    artifact.ArtifactLinears; a value may be a dense Ŵ tensor, as a GGUF's decoded tensors
    are), each as its dense Ŵ while the block is resident (the packed
    kernels are for serving; a block's Ŵ is bounded like the block itself). A compressed
    embedding or head is held dense for the pass (`_vocab_weights`)."""
    decomposed = decomposed or {}
    with_ref = bool(decomposed)
    table, head = _vocab_weights(sm, decomposed)
    h = torch.cat([sm.inputs(seqs[i:i + batch_size], table)[0]
                   for i in range(0, len(seqs), batch_size)])
    ref = (h.clone() if table is None else torch.cat([
        sm.inputs(seqs[i:i + batch_size])[0] for i in range(0, len(seqs), batch_size)])
           ) if with_ref else None
    del table
    for j in range(sm.num_blocks):
        mine = {n: decomposed[n] for n in decomposed if block_index(n) == j}
        with sm.block(j) as blk:
            if with_ref:
                ref = sm.run(blk, ref, batch_size)
            with swapped(sm, j, blk, mine):
                h = sm.run(blk, h, batch_size)
        if on_block:
            on_block((j + 1) / sm.num_blocks)
    return head_result(sm, seqs, h, ref, head, batch_size)


@torch.no_grad()
def head_result(sm: StreamedModel, seqs: torch.Tensor, h: torch.Tensor,
                ref: torch.Tensor | None, head: torch.Tensor | None,
                batch_size: int = 8) -> EvalResult:
    """EvalResult of final hidden states h [N, T, D] on the token ids `seqs` [N, T]: perplexity
    of the next tokens, and with the reference's final states `ref` the mean token
    KL(ref ‖ model) and top-1 agreement over every position (`head`: a dense compressed head,
    or None for the checkpoint's). Shared by stream_evaluate and the streamed experiment."""
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i:i + batch_size].to(h.device)
        targets = torch.cat([batch[:, 1:], batch[:, :1]], 1)   # the last column is unused
        st = sm.head_stats(h[i:i + batch_size], targets,
                           ref[i:i + batch_size] if ref is not None else None, head)
        nll_sum += -st.target_logp()[:, :-1].sum().item()
        count += batch[:, 1:].numel()
        if ref is not None:
            kl_sum += st.kl.sum().item()
            agree += (st.ref_argmax == st.argmax).sum().item()
    positions = seqs.numel()
    nll = nll_sum / count
    return EvalResult(
        ppl=math.exp(nll), nll=nll, tokens=count, sequences=len(seqs), seq_len=seqs.shape[1],
        kl=kl_sum / positions if ref is not None else None,
        top1=agree / positions if ref is not None else None,
    )


@contextmanager
def swapped(sm: StreamedModel, j: int, blk: nn.Module,
            decomposed: Mapping[str, Decomposed]) -> Iterator[nn.Module]:
    """Resident block j with the linears `decomposed` names (full module paths) swapped for
    CompressedLinear; the originals are put back after."""
    prefix = sm.block_name(j) + "."
    old = {}
    for name, dec in decomposed.items():
        local = name[len(prefix):]
        old[local] = blk.get_submodule(local)
        if isinstance(dec, Tensor):   # a dense Ŵ (a GGUF's decoded tensor)
            _set_module(blk, local, _dense_linear(old[local], dec.to(sm.device, sm.dtype)))
        else:
            replace_linear(blk, local, dec, Runtime.DENSE)   # Ŵ while resident: bounded anyway
    try:
        yield blk
    finally:
        for local, mod in old.items():
            _set_module(blk, local, mod)


def _set_module(root: nn.Module, local: str, mod: nn.Module) -> None:
    parent, _, child = local.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, mod)


def _dense_linear(old: nn.Module, w_hat: Tensor) -> nn.Linear:
    """An nn.Linear computing with `w_hat` [out, in] (in the stream's dtype) and `old`'s bias."""
    new = nn.Linear(w_hat.shape[1], w_hat.shape[0], bias=False, device="meta")
    new.weight = nn.Parameter(w_hat, requires_grad=False)
    new.bias = old.bias
    return new


def _vocab_weights(sm: StreamedModel, decomposed: Mapping[str, Decomposed]
                   ) -> tuple[Tensor | None, Tensor | None]:
    """The dense compressed embedding table and head among `decomposed` (None: the
    checkpoint's), each [vocab, D] float32 — one vocabulary tensor, resident for the pass."""
    table = head = None
    for li in vocab_modules(sm.model):
        if li.name in decomposed:
            v = decomposed[li.name]
            w = (v if isinstance(v, Tensor) else v.w_hat()).float().to(sm.device)
            if li.kind in ("embedding", "tied"):
                table = w
            if li.kind in ("head", "tied"):
                head = w
    return table, head


def unigram_ppl(tokenizer, seqs: torch.Tensor, fit_tokens: int = 1_000_000) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on (the first `fit_tokens` of)
    the train split, scored on the same target tokens as `evaluate` (the floor a trained model
    must beat by far)."""
    fit = token_sequences(tokenizer, Split.TRAIN, 1000, n_seqs=max(1, fit_tokens // 1000))
    counts = Counter(fit.reshape(-1).tolist())
    vocab = len(tokenizer)
    total = sum(counts.values()) + vocab
    targets = seqs[:, 1:].reshape(-1).tolist()
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in targets) / len(targets)
    return math.exp(nll)
