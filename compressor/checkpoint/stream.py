"""Run a causal LM block by block straight from its safetensors shards, in bounded memory.

The model is a skeleton: built from its config with every parameter on the meta device (the
buffers, e.g. rotary frequencies, are computed as usual). `StreamedModel.block(j)` reads block
j's tensors from the shards, upcast to the compute dtype, and puts them back on meta when the
block is left, so one block is resident at a time. The input embedding is read only for the
token rows a batch uses; the head is applied in vocabulary chunks (`HeadStats`: log-sum-exp,
arg-max, target log-probs and KL to a reference, online over the chunks, never [N, T, V]).

What the decoder layers need besides the hidden state (rotary cos/sin, masks, positions) is
captured the way compressor.checkpoint.blocks does it: run the base model on the token embeddings with a
forward pre-hook on block 0 that records its arguments and stops the forward. The arguments
depend only on the batch shape (no padding masks), so they are cached per shape.

Tensors are read with plain positioned reads rather than safetensors' mmap: mapped pages of a
file count as the process's resident memory until unmapped, and a profile touches every byte.

Cost: calibration activations [N, T, hidden] (one tensor per stream), one block in the compute
dtype, one vocabulary chunk of logits [B, T, chunk].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.checkpoint.blocks import block_list, final_norm
from compressor.checkpoint.headers import ModelLoadError
from compressor.checkpoint.loading import MODEL_CONSTRUCTION_LOCK, load_config, resolve
from compressor.checkpoint.memory import map_large_allocations, release_free_heap
from compressor.checkpoint.tensor_reader import Checkpoint
from compressor.quant.hessian import is_linear

VOCAB_CHUNK = 8192      # head rows applied at once (logits [B, T, chunk] in float32)
BATCH = 8               # sequences per block forward (the in-memory code's batch size)


class _Stop(Exception):
    """Raised by the block-0 pre-hook: the base model's forward is not needed past there."""


def _set_param(root: nn.Module, name: str, t: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def _restore_weight(module: nn.Module, _args: tuple, _out: object) -> None:
    """Undo `StreamedModel._upcast` after the forward: the stored-dtype weight is back."""
    stored = module.__dict__.pop("_bitplan_stored", None)
    if stored is not None:
        module._parameters["weight"] = stored


@dataclass
class HeadStats:
    """Per-position statistics of log p = log softmax(head(h)), accumulated over vocabulary
    chunks (online log-sum-exp, as in Milakov & Gimelshein 2018); with a reference, also
    KL(ref ‖ model) = Σ_v p_ref(v)·(r_v − m_v) + lse_m − lse_r, accumulated the same way."""

    lse: Tensor                          # [B, T] log Σ exp(logits)
    argmax: Tensor                       # [B, T]
    target_logit: Tensor | None = None   # logits at the targets [B, T]
    kl: Tensor | None = None             # [B, T] KL(ref ‖ model) when a reference was given
    ref_argmax: Tensor | None = None

    def target_logp(self) -> Tensor:
        return self.target_logit - self.lse


class OnlineKL:
    """KL(ref ‖ model_k) = Σ_v p_ref(v)·(r_v − m_v) + lse_m − lse_r for one reference and k
    models, accumulated over vocabulary chunks (online log-sum-exp): per chunk, `chunk(r)` folds
    the reference's logits once (running max c, Σ exp(r − c), lse_r) and `fold(k, m)` each
    model's Σ exp(r − c)(r − m); `kl(k, lse_m)` at the end, given model k's log-sum-exp. One
    model's chunk of logits is needed at a time, never all k."""

    def __init__(self, shape: torch.Size, device: torch.device, models: int = 1) -> None:
        self.c = torch.full(shape, -math.inf, device=device)     # running max of ref logits
        self.z = torch.zeros(shape, device=device)                 # Σ exp(r − c)
        self.lse_r = torch.full(shape, -math.inf, device=device)
        self.s = [torch.zeros(shape, device=device) for _ in range(models)]
        self._r = self._e = self._scale = None

    def chunk(self, r: Tensor, rmax: Tensor | None = None) -> None:
        """The reference's logits r [..., chunk] of the next chunk (`rmax`: r.max(-1) if known)."""
        self.lse_r = torch.logaddexp(self.lse_r, torch.logsumexp(r, -1))
        c_new = torch.maximum(self.c, r.max(-1).values if rmax is None else rmax)
        self._scale = torch.exp(self.c - c_new)
        self._e = torch.exp(r - c_new.unsqueeze(-1))
        self._r = r
        self.z = self.z * self._scale + self._e.sum(-1)
        self.c = c_new

    def fold(self, k: int, m: Tensor) -> None:
        """Model k's logits m over the chunk last given to `chunk`."""
        self.s[k] = self.s[k] * self._scale + (self._e * (self._r - m)).sum(-1)

    def kl(self, k: int, lse_m: Tensor) -> Tensor:
        return self.s[k] / self.z + lse_m - self.lse_r


class StreamedModel:
    """A causal LM skeleton whose weights stay in the checkpoint until a block needs them."""

    def __init__(self, ref: str, trust_remote_code: bool = False, device: str = "cpu",
                 compute_dtype: torch.dtype = torch.float32,
                 vocab_chunk: int = VOCAB_CHUNK) -> None:
        from transformers import AutoModelForCausalLM  # deferred: heavy import
        from transformers.integrations.accelerate import init_empty_weights
        from transformers.modeling_utils import no_init_weights

        map_large_allocations()   # freed block tensors return to the OS (memory.py)
        self.config = load_config(ref, trust_remote_code)
        target = resolve(ref, trust_remote_code)
        if not isinstance(target, Path):
            target = _hub_snapshot(str(ref))
        if len(set(getattr(self.config, "layer_types", None) or ["one"])) > 1:
            raise ModelLoadError(f"model {ref!r} mixes attention layer types; streaming "
                                 "captures one mask for every block (not supported yet)")
        self.ref, self.path = str(ref), Path(target)
        self.device, self.dtype, self.vocab_chunk = torch.device(device), compute_dtype, vocab_chunk
        self.ckpt = Checkpoint(self.path)
        with MODEL_CONSTRUCTION_LOCK, no_init_weights(), init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=trust_remote_code)
        self.model.tie_weights()   # from_config under no_init_weights leaves the head untied
        self.model.eval()
        self.blocks = block_list(self.model)
        names = {id(m): n for n, m in self.model.named_modules()}
        self.block_prefix = names[id(self.blocks)]
        self.embed_name = self._param_name(self.model.get_input_embeddings().weight)
        head = self.model.get_output_embeddings()
        self.head_name = self.ckpt_name(self._param_name(head.weight), fallback=self.embed_name)
        self.embed_name = self.ckpt_name(self.embed_name)
        self._base = self.model.get_submodule(self.block_prefix.rpartition(".")[0])
        skip = {id(self.model.get_input_embeddings().weight), id(head.weight)}
        for name, p in self.model.named_parameters():   # final norm, position embeddings …
            if not name.startswith(self.block_prefix + ".") and id(p) not in skip:
                _set_param(self.model, name, self._read(name))
        for mod in self.model.modules():   # buffers (rotary frequencies) to the device
            for k, b in list(mod._buffers.items()):
                if b is not None and b.device.type != "meta":
                    mod._buffers[k] = b.to(self.device)
        self.norm = final_norm(self.model)
        self._kwargs: dict[tuple, dict] = {}

    # -- names and reads -----------------------------------------------------------------------
    def _param_name(self, p: Tensor) -> str:
        return next(n for n, q in self.model.named_parameters(remove_duplicate=False) if q is p)

    def ckpt_name(self, name: str, fallback: str | None = None) -> str:
        """The checkpoint's name of a parameter (older GPT-2 files drop `transformer.`)."""
        if name in self.ckpt:
            return name
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        if name.startswith(prefix) and name[len(prefix):] in self.ckpt:
            return name[len(prefix):]
        if fallback is not None:
            return self.ckpt_name(fallback)
        raise ModelLoadError(f"model {self.ref!r}: no tensor {name} in its checkpoint")

    def _read(self, name: str, rows: tuple[int, int] | None = None, cast: bool = True) -> Tensor:
        t = self.ckpt.get(self.ckpt_name(name), rows)
        return t.to(self.device, self.dtype if t.is_floating_point() and cast else t.dtype)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (its input embedding's)."""
        return self.ckpt.entry(self.embed_name).dtype

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, j: int) -> str:
        return f"{self.block_prefix}.{j}"

    # -- blocks --------------------------------------------------------------------------------
    @contextmanager
    def block(self, j: int) -> Iterator[nn.Module]:
        """Block j with its weights read in, on the device; back on meta after. The linears'
        weights stay at the checkpoint's dtype (fp16/bf16: half the memory of float32) and are
        upcast to the compute dtype only for the length of each linear's forward — exactly
        (an upcast is exact), so every result equals running the block upcast as a whole.
        Readers of a weight upcast it themselves (`linear_weight(m).float()`)."""
        blk, prefix = self.blocks[j], self.block_name(j)
        shapes = {n: (p.shape, p.dtype) for n, p in blk.named_parameters()}
        linears = {n: m for n, m in blk.named_modules() if is_linear(m)}
        for n in shapes:
            owner, _, leaf = n.rpartition(".")
            _set_param(blk, n, self._read(f"{prefix}.{n}", cast=not (owner in linears
                                                                    and leaf == "weight")))
        hooks = [h for m in linears.values()
                 for h in (m.register_forward_pre_hook(self._upcast),
                           m.register_forward_hook(_restore_weight))]
        try:
            yield blk
        finally:
            for h in hooks:
                h.remove()
            for n, (shape, dtype) in shapes.items():
                _set_param(blk, n, torch.empty(shape, dtype=dtype, device="meta"))
            release_free_heap()   # the block's freed memory back to the OS (memory.py)

    def _upcast(self, module: nn.Module, _args: tuple) -> None:
        stored = module._parameters["weight"]
        if stored.dtype != self.dtype:
            module.__dict__["_bitplan_stored"] = stored   # not registered as a parameter
            module._parameters["weight"] = nn.Parameter(stored.to(self.dtype),
                                                        requires_grad=False)

    def embed(self, ids: Tensor, table: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, D] from the rows `ids` uses, read in windows; `table`: a
        dense [vocab, D] embedding to look them up in instead (a compressed or perturbed one)."""
        if table is not None:
            return table[ids].to(self.device, self.dtype)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.empty(len(uniq), self.ckpt.entry(self.embed_name).shape[1],
                           dtype=self.dtype, device=self.device)
        u = uniq.tolist()
        k = 0
        while k < len(u):
            a = u[k]
            b = a + self.vocab_chunk
            window = self.ckpt.get(self.embed_name, (a, min(b, self._rows(self.embed_name))))
            start = k
            while k < len(u) and u[k] < b:
                k += 1
            rows[start:k] = window[torch.tensor(u[start:k]) - a].to(self.device, self.dtype)
        return rows[inverse.to(self.device)]

    def _rows(self, name: str) -> int:
        return self.ckpt.entry(name).shape[0]

    def inputs(self, ids: Tensor, table: Tensor | None = None,
               embeds: Tensor | None = None) -> tuple[Tensor, dict]:
        """Block 0's input for the token ids [B, T] and the keyword arguments every block gets
        (`table`: as `embed`'s; `embeds`: the token embeddings themselves, e.g. a tensor that
        requires grad, for the Fisher probe's lookup gradient)."""
        emb = embeds if embeds is not None else self.embed(ids.to(self.device), table)
        key = (tuple(ids.shape), emb.dtype)
        got: dict = {}

        def pre_hook(module, args, kw):
            got["h"] = args[0] if args else kw["hidden_states"]
            got["kw"] = {k: v for k, v in kw.items() if k != "hidden_states"}
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            self._base(inputs_embeds=emb, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if key not in self._kwargs:
            kw = got["kw"]
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("layer_past", None)
            self._kwargs[key] = kw
        return got["h"], self._kwargs[key]

    def kwargs_for(self, batch: int, seq_len: int) -> dict:
        """The block arguments for a batch shape (captured once per shape)."""
        key = ((batch, seq_len), self.dtype)
        if key not in self._kwargs:
            self.inputs(torch.zeros(batch, seq_len, dtype=torch.long))
        return self._kwargs[key]

    @torch.no_grad()
    def run(self, blk: nn.Module, h: Tensor, batch: int = BATCH) -> Tensor:
        """Block output for hidden states h [N, T, D], `batch` sequences per call."""
        out = torch.empty_like(h)
        for i in range(0, len(h), batch):
            x = h[i:i + batch]
            res = blk(x, **self.kwargs_for(len(x), x.shape[1]))
            out[i:i + batch] = res[0] if isinstance(res, tuple) else res
        return out

    # -- head ----------------------------------------------------------------------------------
    @torch.no_grad()
    def head_stats(self, h: Tensor, targets: Tensor | None = None,
                   ref: Tensor | None = None, head: Tensor | None = None) -> HeadStats:
        """Log-prob statistics of final hidden states h [B, T, D] (before the final norm);
        `ref` [B, T, D]: the reference model's final hidden states, for KL and its top-1;
        `head`: a dense [vocab, D] float32 head for h in place of the checkpoint's (a compressed
        or perturbed one; the reference always reads the checkpoint's)."""
        x = self.norm(h).float()
        xr = self.norm(ref).float() if ref is not None else None
        shape = h.shape[:-1]
        lse = torch.full(shape, -math.inf, device=h.device)
        best = torch.full(shape, -math.inf, device=h.device)
        arg = torch.zeros(shape, dtype=torch.long, device=h.device)
        tgt = torch.zeros(shape, device=h.device) if targets is not None else None
        if xr is not None:
            kl = OnlineKL(shape, h.device)
            rbest = torch.full(shape, -math.inf, device=h.device)
            rarg = torch.zeros(shape, dtype=torch.long, device=h.device)
        for a, b, W, bb in self.head_chunks():
            m = F.linear(x, W if head is None else head[a:b], bb)
            lse = torch.logaddexp(lse, torch.logsumexp(m, -1))
            cmax, cidx = m.max(-1)
            upd = cmax > best
            best, arg = torch.where(upd, cmax, best), torch.where(upd, cidx + a, arg)
            if tgt is not None:
                inside = (targets >= a) & (targets < b)
                idx = (targets - a).clamp(0, b - a - 1).unsqueeze(-1)
                tgt = torch.where(inside, m.gather(-1, idx).squeeze(-1), tgt)
            if xr is not None:
                r = F.linear(xr, W, bb)
                rmax, ridx = r.max(-1)
                upd = rmax > rbest
                rbest, rarg = torch.where(upd, rmax, rbest), torch.where(upd, ridx + a, rarg)
                kl.chunk(r, rmax)
                kl.fold(0, m)
        out = HeadStats(lse, arg, tgt)
        if xr is not None:
            out.kl = kl.kl(0, lse)
            out.ref_argmax = rarg
        return out

    def head_chunks(self) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
        """The head in vocabulary chunks: (first row, end row, weight [rows, D] and bias in
        float32 on the device), each read from the checkpoint when reached."""
        vocab = self._rows(self.head_name)
        bias = self._head_bias()
        for a in range(0, vocab, self.vocab_chunk):
            b = min(vocab, a + self.vocab_chunk)
            W = self.ckpt.get(self.head_name, (a, b)).to(self.device, torch.float32)
            yield a, b, W, (bias[a:b] if bias is not None else None)

    def vocab_weight(self, name: str) -> Tensor:
        """The whole [vocab, D] weight of the vocabulary item `name` (a module path: the
        embedding or the head) in float32 on the device."""
        return self.ckpt.get(self.ckpt_name(f"{name}.weight")).to(self.device, torch.float32)

    def _head_bias(self) -> Tensor | None:
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is None:
            return None
        return self._read(self._param_name(head.bias)).float()


def _hub_snapshot(ref: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as exc:   # any failure means the weights are not on this machine
        raise ModelLoadError(f"model {ref!r}: no local copy to stream from: {exc}") from exc


def write_kept(sm: StreamedModel, compressed: set[str], writer) -> None:
    """Hand `writer` (an artifact.ArtifactWriter) every tensor of the state dict but the
    compressed linears' weights, in state-dict order: parameters as raw byte ranges of the
    checkpoint (their stored dtype, copied in chunks, never resident whole), persistent buffers
    from the skeleton; tensors tied to an earlier one as aliases (`writer.tie`)."""
    seen: dict[int, str] = {}
    dropped: set[int] = set()   # compressed weights and their aliases (a tied head)
    for key, t in sm.model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if id(t) in dropped or (owner in compressed and leaf != "bias"):
            dropped.add(id(t))
            continue
        if id(t) in seen and t.numel():
            writer.tie(key, seen[id(t)])
            continue
        seen[id(t)] = key
        if isinstance(t, nn.Parameter):   # at its stored dtype, not the resident copy's
            e = sm.ckpt.entry(sm.ckpt_name(key))
            writer.add_kept_from_file(key, e.dtype, e.shape, e.file, e.start)
        else:
            writer.add_kept(key, t.detach().cpu().contiguous())
