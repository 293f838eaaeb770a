"""Train the bundled demo model: a small Qwen2ForCausalLM with its own BPE tokenizer.

Deterministic given a seed (single-threaded data order, seeded init, fixed step count). The
shape is chosen so that compression has something to find: 12 blocks for a sensitivity profile,
grouped-query attention, and an MLP width (520) that is not a multiple of 128 so padding paths
run on real weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compressor.checkpoint.data import Split, _encode, load_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 520
    num_layers: int = 12
    num_heads: int = 6
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 800
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.05
    eval_every: int = 100
    stop_at: int | None = 400    # the bundled model stops here on the 800-step schedule (CPU time)
    seed: int = 0
    eval_seqs: int = 64
    keep_best: bool = False      # save the checkpoint with the lowest valid loss, not the last
    device: str = "cpu"
    max_wall_s: float | None = None   # stop at the first eval past this (best checkpoint kept)


# The bundled model's recipe: ~20 epochs of the train split with the best valid checkpoint kept.
# Trained on one GPU (~3 min); on 2 CPU cores it would take about a day. A model trained this far
# is sensitive to 2-bit compression, the regime the experiment needs (an under-trained one is not).
GPU_RECIPE = DemoConfig(batch_size=64, steps=3000, warmup=100, weight_decay=0.1, eval_every=250,
                        stop_at=None, eval_seqs=256, keep_best=True, device="cuda",
                        max_wall_s=240)


def train_tokenizer(vocab_size: int, data_dir: Path | None = None):
    """Byte-level BPE trained on the train split only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    docs = load_text(Split.TRAIN, data_dir).split("\n# file: ")
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=1024,
    )


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _eval_loss(model, ids: torch.Tensor, seq_len: int, max_seqs: int = 64) -> float:
    n = min(max_seqs, ids.numel() // seq_len)
    windows = ids[: n * seq_len].view(n, seq_len).to(next(model.parameters()).device)
    model.eval()
    losses = [model(input_ids=windows[i : i + 16], labels=windows[i : i + 16]).loss.item()
              for i in range(0, n, 16)]
    model.train()
    return sum(losses) / len(losses)


def train_demo(out_dir: Path, cfg: DemoConfig = DemoConfig(), data_dir: Path | None = None,
               checkpoint_dir: Path | None = None, tokenizer_from: Path | None = None) -> dict:
    """Train tokenizer + model, save both to out_dir in HF format, return the training record.

    `tokenizer_from` reuses a saved tokenizer (the bundled one) instead of training a new one.
    """
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        tokenizer = train_tokenizer(cfg.vocab_size, data_dir)
    train_ids = torch.tensor(_encode(tokenizer, load_text(Split.TRAIN, data_dir)))
    valid_ids = torch.tensor(_encode(tokenizer, load_text(Split.VALID, data_dir)))
    log.info("train tokens %d, valid tokens %d", train_ids.numel(), valid_ids.numel())

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    from compressor.checkpoint.loading import MODEL_CONSTRUCTION_LOCK

    with MODEL_CONSTRUCTION_LOCK:
        model = Qwen2ForCausalLM(config)
    model.to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    max_start = train_ids.numel() - cfg.seq_len - 1
    curve: list[dict] = []
    best: tuple[float, int, dict] | None = None   # (valid loss, step, weights on the CPU)
    t0 = time.time()
    model.train()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    for step in range(last):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, max_start, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()])
        batch = batch.to(cfg.device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == last:
            vloss = _eval_loss(model, valid_ids, cfg.seq_len, cfg.eval_seqs)
            elapsed = time.time() - t0
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "valid_loss": round(vloss, 4), "valid_ppl": round(math.exp(vloss), 3),
                          "elapsed_s": round(elapsed, 1)})
            log.info("step %d train %.3f valid %.3f (ppl %.2f) %.0fs", step + 1, loss.item(),
                     vloss, math.exp(vloss), elapsed)
            if cfg.keep_best and (best is None or vloss < best[0]):
                best = (vloss, step + 1, {k: v.detach().cpu().clone()
                                          for k, v in model.state_dict().items()})
            if checkpoint_dir is not None:  # intermediate snapshots, for work in parallel
                model.save_pretrained(checkpoint_dir, safe_serialization=True)
                tokenizer.save_pretrained(checkpoint_dir)
            if cfg.max_wall_s and elapsed > cfg.max_wall_s:
                log.warning("stopping at step %d: past max_wall_s=%s", step + 1, cfg.max_wall_s)
                last = step + 1
                break
    if best is not None:
        model.load_state_dict(best[2])
    model.to("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {"config": asdict(cfg), "curve": curve,
              "params": sum(p.numel() for p in model.parameters()),
              "train_tokens_seen": last * cfg.batch_size * cfg.seq_len,
              "train_tokens": train_ids.numel(), "kept_step": best[1] if best else last,
              "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda")
              else "cpu",
              "wall_s": round(time.time() - t0, 1)}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record
