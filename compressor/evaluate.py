"""Model quality on the test split: perplexity, and against a reference model the mean token
KL(reference ‖ model) and top-1 agreement. Deterministic: fixed sequences in a fixed order.

Perplexity alone can mislead (the research note's Goodhart caveat), so KL and top-1 agreement
to the uncompressed model are always reported beside it when a reference is given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressor.data import Split, token_sequences


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
