"""Profile once: per-linear sensitivity α_i and error samples → fitted E_i(b, r), stored per
linear so a killed run resumes where it stopped. Then any budget is solved from the profile
alone: predicted ΔKL(plan) = Σ α_i · E_i(b_i, r_i) (HIGGS-style linearity, see sensitivity.py).

Per linear the profile costs: one stacked LDLQ sweep for the Q-only samples at every sampled
bit width and group size (compressor.quant.rounding.ldlq_many), one SVD of the H-weighted residual
(the rank curve for every rank at once), a few full CALDERA decompositions at anchor
(bits, rank) points (sharing the sweep's rotation and O(n³) factorizations and starting from
its Q: compressor.quant.problem), and one noise probe carried through the blocks after it.

Streamed (compressor.checkpoint.stream): each block is read from the checkpoint once, its Hessians exist
only while it is resident, and the calibration activations flow block to block.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.loading import Inventory, KeptParam, discover, load_tokenizer
from compressor.checkpoint.memory import StageClock
from compressor.checkpoint.stream import BATCH, StreamedModel
from compressor.pipeline.ct_target import CT_RANKS
from compressor.pipeline.fisher import make_probes
from compressor.pipeline.gguf_target import GGUF_MENU
from compressor.pipeline.planning import is_measured_fit
from compressor.pipeline.profile_store import Profile, ProfileStore, profile_key
from compressor.pipeline.sampling import sample_record
from compressor.pipeline.sensitivity import spearman, summarize
from compressor.pipeline.targets import check_target, fixed_bytes, planned_linears, plans_vocab
from compressor.pipeline.vocab import head_reads, sample_vocab_items, start_vocab_probes
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import HessianHooks, linear_weight
from solver.budget import fp16_reference_bytes
from solver.bytes import Option
from solver.ct_schemes import CT_BITS, CT_GROUPS, CT_TARGET
from solver.errormodel import ErrorModel

Progress = Callable[[str, float], None]
FISHER = ("sensitivity", "fisher_seqs", "fisher_samples")   # fields a probe profile omits
GGUF = ("gguf_types", "gguf_tied")                # fields only a GGUF profile has
CT = ("ct_bits", "ct_groups", "ct_ranks")          # fields only a compressed-tensors one has

# One outer CALDERA iteration with two L/R alternations: about a third of the default's time.
# Plans are executed with the same config they were profiled with, so predictions match.
FAST_DECOMPOSITION = DecompositionConfig(outer_iters=1, lr_iters=2)


@dataclass(frozen=True)
class ProfileConfig:
    calib_seqs: int = 32                 # Hessians: 32 × 256 tokens
    # α per linear: "probe" (sensitivity.py: noise carried to the head on probe_seqs) or
    # "fisher" (fisher.py: the Fisher trace, fisher_samples label draws on fisher_seqs)
    sensitivity: str = "fisher"
    probe_seqs: int = 2                  # sensitivity probes replay the first 2 of them
    fisher_seqs: int = 8
    fisher_samples: int = 1
    seq_len: int = 256
    seed: int = 0
    probe_t: float = 0.1                 # relative error of the sensitivity noise probe
    q_bits: tuple[int, ...] = (2, 3, 4, 6)             # Q-only samples (rank 0)
    # full decompositions at (bits, rank / max_rank): one identifies the fit's factor floor c
    anchors: tuple[tuple[int, float], ...] = ((2, 0.25),)
    tail_bits: int = 3                   # bits of the residual whose spectrum gives S(r)
    max_rank_fraction: float = 0.5       # ranks considered: 0 … fraction · min(m, n)
    factor_bits: int = 4
    group_size: int = 128
    # larger groups the planner may choose (cheaper scales, slightly more error): κ_g sampled
    # Q-only at group_bits, relative to group_size (see solver/errormodel.py)
    extra_groups: tuple[int, ...] = (256, 512)
    group_bits: tuple[int, ...] = (2, 4)
    decomposition: DecompositionConfig = field(default_factory=lambda: FAST_DECOMPOSITION)
    # what the plan is served by (targets.py): "native" (CALDERA, our runtime), "gguf"
    # (llama.cpp types, gguf_target.py: every type of gguf_types a tensor's rows fit is
    # sampled) or "compressed-tensors" (vLLM schemes, ct_target.py: every ct_bits × ct_groups
    # a linear's rows fit, each with every LoRA rank of ct_ranks)
    target: str = "native"
    gguf_types: tuple[str, ...] = GGUF_MENU
    gguf_tied: str = "head"      # a tied tensor rounded as the head it is (vocab.head_reads)
    ct_bits: tuple[int, ...] = CT_BITS
    ct_groups: tuple[int, ...] = CT_GROUPS
    ct_ranks: tuple[int, ...] = CT_RANKS

    def __post_init__(self) -> None:
        check_target(self.target, self.gguf_tied)
        if self.sensitivity not in ("probe", "fisher"):
            raise ValueError(f"sensitivity must be probe or fisher, got {self.sensitivity!r}")
        if len(set(self.q_bits)) < 3:   # the fit of Q alone (the embedding's) needs 3 points
            raise ValueError(f"q_bits needs at least 3 bit widths, got {list(self.q_bits)}")
        if self.extra_groups and not set(self.group_bits) <= set(self.q_bits):
            raise ValueError(f"group_bits {self.group_bits} must be among q_bits {self.q_bits}")

    def to_dict(self) -> dict:
        d = asdict(self) | {"decomposition": self.decomposition.to_dict(),
                            "q_bits": list(self.q_bits),
                            "extra_groups": list(self.extra_groups),
                            "group_bits": list(self.group_bits),
                            "anchors": [list(a) for a in self.anchors],
                            "gguf_types": list(self.gguf_types), "ct_bits": list(self.ct_bits),
                            "ct_groups": list(self.ct_groups), "ct_ranks": list(self.ct_ranks)}
        # a probe (native) profile keeps the dict, so the key, it had before Fisher (targets)
        return {k: v for k, v in d.items() if (self.sensitivity != "probe" or k not in FISHER)
                and (self.target != "native" or k != "target")
                and (self.target == "gguf" or k not in GGUF)
                and (self.target == CT_TARGET or k not in CT)}

    @classmethod
    def from_dict(cls, d: dict) -> ProfileConfig:
        d = dict(d)
        d["decomposition"] = DecompositionConfig.from_dict(d.get("decomposition", {}))
        d["q_bits"] = tuple(d.get("q_bits", cls.q_bits))
        # profiles made before group sizes were planned carry no extra groups
        d["extra_groups"] = tuple(d.get("extra_groups", ()))
        d["group_bits"] = tuple(d.get("group_bits", cls.group_bits))
        d["anchors"] = tuple(tuple(a) for a in d.get("anchors", cls.anchors))
        d["gguf_types"] = tuple(d.get("gguf_types", GGUF_MENU))
        for k in CT:
            d[k] = tuple(d.get(k, getattr(cls, k)))
        d.setdefault("sensitivity", "probe")     # profiles made before the Fisher option
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def q_only_options(self) -> list[Option]:
        """The Q-only (rank 0) samples of a linear: every q_bits at group_size, then every
        group_bits at each extra group, in that order."""
        return ([Option(b, 0, self.factor_bits, self.group_size) for b in self.q_bits]
                + [Option(b, 0, self.factor_bits, g) for g in self.extra_groups
                   for b in self.group_bits])

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(1, int(self.max_rank_fraction * min(out_features, in_features)))


def calibration(tokenizer, cfg: ProfileConfig) -> torch.Tensor:
    return token_sequences(tokenizer, Split.TRAIN, cfg.seq_len, cfg.calib_seqs, seed=cfg.seed)


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_hash_of(model_ref: str) -> str:
    """sha256 of the safetensors files (streaming reads them, so they are always at hand)."""
    from compressor.artifact.native import source_sha256
    return source_sha256(model_ref) or "unknown"


PARTIAL = ":samples"   # store key suffix of records whose α is still pending


def partial_key(key: str) -> str:
    """Where a linear's samples wait for its α (known once its probe met the head)."""
    return key + PARTIAL


def stream_inventory(sm: StreamedModel) -> Inventory:
    """The skeleton's inventory with kept tensors counted at their stored dtype (what the
    artifact keeps and the budget's fixed bytes count)."""
    inv = discover(sm.model)
    kept = []
    for k in inv.kept:
        e = sm.ckpt.entry(sm.ckpt_name(k.name))
        kept.append(KeptParam(k.name, k.shape, str(e.dtype).removeprefix("torch."),
                              math.prod(k.shape) * e.dtype.itemsize))
    inv.kept = kept
    return inv


@dataclass
class Sweep:
    """What one pass over blocks [first, last) measured besides the stored records."""

    block_influence: list[float]
    timings: dict[str, float]


@torch.no_grad()
def sweep_blocks(sm: StreamedModel, calib: torch.Tensor, cfg: ProfileConfig, key: str,
                 store: ProfileStore, inv: Inventory, blocks: range | None = None,
                 report: Progress | None = None, clock: StageClock | None = None) -> Sweep:
    """Profile the linears of `blocks` (default: all), reading each block once.

    Blocks before the range only carry the calibration and probe streams forward; blocks in it
    also collect their Hessians (one block at a time), sample their linears (stored under
    `partial_key(key)` as they finish) and start their probe streams; blocks after it carry the
    probe streams to the head. A linear's record goes to `key` once its α is known. Resumable:
    complete records are skipped; partial ones skip their sampling. The sweep that holds the
    last block also profiles the embedding and head (compressor.pipeline.vocab)."""
    L = sm.num_blocks
    blocks = blocks if blocks is not None else range(L)
    report = report or (lambda stage, frac: None)
    clock = clock or StageClock()
    records = store.linear_records(key)
    partial = store.linear_records(partial_key(key))
    by_block: dict[int, list] = {}
    by_name = {li.name: li for li in inv.linears}
    for li in inv.linears:
        by_block.setdefault(li.block, []).append(li)
    with clock.stage("inputs"):
        parts = [sm.inputs(calib[i:i + BATCH])[0] for i in range(0, len(calib), BATCH)]
        X = torch.cat(parts)
        del parts
        probes = make_probes(sm, calib, cfg, report)
        # the embedding and head: profiled by the sweep holding the last block (vocab.py)
        vocab = [li for li in inv.linears if li.is_vocab and li.name not in records
                 ] if blocks.stop == L and plans_vocab(cfg.target) else []
        start_vocab_probes(sm, probes, vocab, cfg.probe_t, cfg.seed, head_reads(cfg))
    span = max(len(blocks), 1)
    for j in range(L):
        if j >= blocks.stop and not probes.pending:
            probes.block_influence.extend([math.nan] * (L - j))   # not measured by this shard
            break
        mine = by_block.get(j, []) if j in blocks else []
        probe = [li.name for li in mine if li.name not in records]
        with sm.block(j) as blk:
            hooks = (HessianHooks(blk, probe, prefix=sm.block_name(j) + ".") if probe else None)
            if j < blocks.stop:
                with clock.stage("calibration"):
                    X = sm.run(blk, X)
            hessians = hooks.result(calib.numel()) if hooks else {}
            with clock.stage("sampling"):
                for k, name in enumerate(probe):
                    # popped: a Hessian (shared by q/k/v, by gate/up) is freed after its last
                    # linear, so sampling the next one and the probes below hold fewer
                    H = hessians.pop(name)
                    mod = blk.get_submodule(name[len(sm.block_name(j)) + 1:])
                    if name not in partial:
                        partial[name] = sample_record(by_name[name], mod, H, cfg)
                        store.put_linear(partial_key(key), partial[name])
                        report("linears", 0.05 + 0.9 * (j - blocks.start + (k + 1) / len(probe))
                               / span)
                    probes.scale(name, linear_weight(mod), H)
                    del H
            with clock.stage("probes"):
                probes.block(j, blk, probe)
            del hessians, hooks
        if j in blocks:
            report(f"block {j + 1}/{L}", 0.05 + 0.9 * (j - blocks.start + 1) / span)
    with clock.stage("sampling"):
        sample_vocab_items(sm, probes, vocab, X, cfg, partial,
                           lambda rec: store.put_linear(partial_key(key), rec))
    with clock.stage("probes"):
        alpha = probes.finish()
    for name, a in alpha.items():
        rec = partial[name]
        rec.alpha = a
        store.put_linear(key, rec)
    return Sweep(probes.block_influence, clock.seconds)


@dataclass
class ProfileSource:
    """What every pass over one model's profile shares: the streamed model, its calibration
    tokens and the profile key (weights × calibration × config)."""

    model_ref: str
    cfg: ProfileConfig
    sm: StreamedModel
    calib: torch.Tensor
    weights_hash: str
    key: str

    @cached_property
    def inventory(self) -> Inventory:   # read by the sweep, the assembly and the shard checks
        return stream_inventory(self.sm)


def open_profile(model_ref: str, cfg: ProfileConfig, *, device: str = "cpu",
                 trust_remote_code: bool = False, weights_hash: str | None = None
                 ) -> ProfileSource:
    """Open `model_ref` for profiling (the meta skeleton, no weights read). `weights_hash`: the
    sha256 a caller already knows (a profile shard), so the shards are not hashed again."""
    tokenizer = load_tokenizer(model_ref, trust_remote_code)
    sm = StreamedModel(model_ref, trust_remote_code, device)
    calib = calibration(tokenizer, cfg)
    whash = weights_hash or weights_hash_of(model_ref)
    return ProfileSource(str(model_ref), cfg, sm, calib, whash,
                         profile_key(whash, tensor_hash(calib), cfg.to_dict()))


def shard_ranges(num_blocks: int, shards: int) -> list[range]:
    """Contiguous block ranges for `shards` workers, sizes differing by at most one."""
    n = max(1, min(shards, num_blocks))
    cuts = [round(i * num_blocks / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def assemble_profile(src: ProfileSource, store: ProfileStore, block_influence: list[float],
                     stats: dict) -> Profile:
    """The stored profile from every linear's record (each with its α) and the per-block
    influence measured by whichever sweep held the block; stored under `src.key`."""
    inv = src.inventory
    records = store.linear_records(src.key)
    planned = planned_linears(inv, src.cfg.target)
    missing = [li.name for li in planned if li.name not in records]
    if missing:
        raise ValueError(f"profile {src.key[:12]} lacks {len(missing)} linears "
                         f"(first: {missing[0]}); run the missing blocks again")
    linears = [records[li.name] for li in planned]
    sens = summarize({lp.name: lp.alpha for lp in linears}, block_influence)
    for lp in linears:
        lp.proxy = sens.block_influence[lp.block] if lp.block is not None else 0.0
    fits = [ErrorModel.from_dict(lp.fit) for lp in linears if not is_measured_fit(lp.fit)]
    profile = Profile(
        key=src.key, model_ref=src.model_ref, weights_hash=src.weights_hash,
        calib_hash=tensor_hash(src.calib), config=src.cfg.to_dict(),
        fixed_bytes=fixed_bytes(inv, src.cfg.target), linears=linears, block_sensitivity=sens.block_alpha,
        block_proxy=sens.block_influence,
        stats={"fit_r2_mean": sum(f.r2_fit or 0 for f in fits) / max(len(fits), 1),
               "spearman_alpha_vs_proxy": spearman(sens.block_alpha, sens.block_influence),
               "num_blocks": inv.num_blocks, "linear_params": inv.linear_params,
               "fp16_bytes": fp16_reference_bytes(
                   inv.linear_params, sum(math.prod(k.shape) for k in inv.kept)), **stats},
    )
    store.put(profile)
    return profile


def run_profile(model_ref: str, store: ProfileStore, *, device: str = "cpu",
                trust_remote_code: bool = False, progress: Progress | None = None,
                config: ProfileConfig | None = None,
                source: ProfileSource | None = None) -> Profile:
    """Profile `model_ref` (or return the stored profile with the same key), streaming it block
    by block from its shards (compressor.checkpoint.stream). Idempotent and resumable: finished linears are
    read back from the store, not measured again. One sweep over every block; the job queue
    splits the same work into block-range shards (service.jobs.stages.shards). `source`: the
    model already opened (and its weights hashed) by the caller."""
    cfg = config or ProfileConfig()
    report = progress or (lambda stage, frac: None)
    clock = StageClock()
    t_start = time.perf_counter()
    report("load", 0.0)
    with clock.stage("load"):
        src = source or open_profile(model_ref, cfg, device=device,
                                     trust_remote_code=trust_remote_code)
    if (done := store.get(src.key)) is not None:
        report("done", 1.0)
        return done
    sweep = sweep_blocks(src.sm, src.calib, cfg, src.key, store, src.inventory, report=report,
                         clock=clock)
    mem = clock.report(device)
    profile = assemble_profile(src, store, sweep.block_influence, {
        "wall_s": round(time.perf_counter() - t_start, 2),
        "sampling_s": round(clock.seconds.get("sampling", 0.0), 2),
        "probe_s": round(clock.seconds.get("probes", 0.0), 2), **mem})
    report("done", 1.0)
    return profile
