"""Model commands: train-demo, import-gguf, eval, generate, layers."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from compressor import api
from service.errors import UserError
from service.settings import DEMO_MODEL, get_settings

# torch and the compressor's model code are imported inside each command (marked "torch"), so
# `bitplan --help` and the service commands start without loading them.


def register(sub) -> None:
    p = sub.add_parser("train-demo", help="train the bundled demo model (Qwen2, BPE tokenizer)")
    p.add_argument("--out", type=Path, default=DEMO_MODEL)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps of the schedule (the bundled model's recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=["gpu", "cpu"], default="gpu",
                   help="gpu: the bundled model's recipe (~3 min on one GPU); cpu: a short "
                        "800-step schedule stopped at step 400 (~1 h on 2 cores, less trained)")
    p.add_argument("--device", default=None, help="default: cuda for the gpu recipe, else cpu")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="reuse this saved tokenizer instead of training one (e.g. the bundled "
                        "model's, to keep its token ids)")
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("import-gguf", help="a GGUF file (any transformers reads) → a Hugging "
                                           "Face safetensors model directory with its tokenizer")
    p.add_argument("file", type=Path, help="the .gguf file")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.add_argument("--dtype", choices=["auto", "bf16", "float16", "float32"], default="auto",
                   help="auto (default): the file's float type when its tensors are "
                        "F16/BF16/F32, else bf16 (a quantized GGUF)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("eval", help="test-split perplexity; KL and top-1 vs a reference")
    p.add_argument("model", help="model directory, hub id, or compressed artifact directory")
    p.add_argument("--reference", help="reference model for KL(reference ‖ model) and top-1")
    p.add_argument("--seqs", type=int, default=None, help="number of test sequences")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dense", action="store_true",
                   help="artifacts: cache each dense Ŵ (faster on CPU, m·n values a linear)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream a continuation of a prompt, then tokens/s and "
                                        "resident memory")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--dense", action="store_true", help="artifacts: cache each dense Ŵ")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("layers", help="list compressible linears and kept parameters")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)


def cmd_train_demo(args) -> int:
    import torch

    from compressor.research.demo_model import GPU_RECIPE, DemoConfig, train_demo  # torch

    cfg = dataclasses.replace(GPU_RECIPE if args.recipe == "gpu" else DemoConfig(),
                              seed=args.seed)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA device here: pass --device cpu (slow) or --recipe cpu")
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.stop_at:
        cfg = dataclasses.replace(cfg, stop_at=args.stop_at)
    record = train_demo(args.out, cfg, tokenizer_from=args.tokenizer_from)
    print(json.dumps({"out": str(args.out), "params": record["params"],
                      "final": record["curve"][-1]}, indent=2))
    return 0


def cmd_import_gguf(args) -> int:
    from compressor.checkpoint.gguf_import import import_gguf  # torch

    result = import_gguf(args.file, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {result.out} ({result.dtype}, {result.weight_bytes / 2**20:.1f} MiB of "
          f"weights, tied head: {result.tied}) in {result.seconds['total']:.1f} s",
          file=sys.stderr)
    print(json.dumps(result.to_dict()))
    return 0


def load_any(ref: str, dense: bool = False):
    """A plain HF model or a compressed artifact directory (it has a bitplan manifest); an
    artifact loads through AutoModelForCausalLM.from_pretrained with bitplan's registered
    quantizer (packed linears; `dense` caches each Ŵ instead)."""
    from compressor.checkpoint.loading import load_model, load_tokenizer  # torch

    settings = get_settings()
    path = Path(ref)
    if (path / "bitplan_manifest.json").is_file():
        return api.load(path, device=settings.device, dense=dense)
    model = load_model(ref, trust_remote_code=settings.trust_remote_code, device=settings.device)
    return model, load_tokenizer(ref, trust_remote_code=settings.trust_remote_code)


def cmd_eval(args) -> int:
    from compressor.pipeline.evaluate import (  # torch
        eval_sequences,
        evaluate,
        reference_logprobs,
        unigram_ppl,
    )

    settings = get_settings()
    artifact = (Path(args.model) / "bitplan_manifest.json").is_file()
    if not artifact and not args.reference:
        # a plain checkpoint: streamed block by block (one block resident), any size
        from compressor.checkpoint.loading import load_tokenizer
        from compressor.checkpoint.stream import StreamedModel
        from compressor.pipeline.evaluate import stream_evaluate

        tokenizer = load_tokenizer(args.model, trust_remote_code=settings.trust_remote_code)
        seqs = eval_sequences(tokenizer, args.seq_len or settings.eval_seq_len,
                              args.seqs or settings.eval_seqs)
        sm = StreamedModel(args.model, settings.trust_remote_code, settings.device)
        result = stream_evaluate(sm, seqs)
    else:   # a packed artifact (small) and, with --reference, the reference's logprobs
        model, tokenizer = load_any(args.model, dense=args.dense)
        seqs = eval_sequences(tokenizer, args.seq_len or settings.eval_seq_len,
                              args.seqs or settings.eval_seqs)
        ref = None
        if args.reference:
            ref_model, _ = load_any(args.reference)
            ref = reference_logprobs(ref_model, seqs)
            del ref_model
        result = evaluate(model, seqs, reference=ref, progress=sys.stderr.isatty())
    out = result.to_dict() | {"unigram_ppl": unigram_ppl(tokenizer, seqs)}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>12}: {v}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from compressor.checkpoint.memory import packed_linear_bytes, peak_rss_bytes, rss_bytes

    model, tokenizer = load_any(args.model, dense=args.dense)
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    streamer = _TimedStreamer(tokenizer)
    sampling = {} if args.greedy else {"do_sample": True, "top_k": 40, "temperature": 0.8}
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                         pad_token_id=tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    # decode rate excludes the prompt's prefill: tokens after the first over the time since it
    first = streamer.first_token_at
    decode = (new - 1) / (time.perf_counter() - first) if first and new > 1 else float("nan")
    mib = 1 << 20
    print(f"\n[{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tok/s overall, "
          f"{decode:.1f} tok/s decode · resident {rss_bytes() / mib:.1f} MiB "
          f"(peak {peak_rss_bytes() / mib:.1f} MiB) · packed linears "
          f"{packed_linear_bytes(model) / mib:.2f} MiB]", file=sys.stderr)
    return 0


class _TimedStreamer:
    """transformers' TextStreamer (prints text as it is generated, prompt included) that also
    notes when the first new token arrived."""

    def __init__(self, tokenizer) -> None:
        from transformers import TextStreamer  # deferred: the CLI starts without transformers

        self._inner = TextStreamer(tokenizer, skip_special_tokens=True)
        self._calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2:     # the first put is the prompt, the second the first new token
            self.first_token_at = time.perf_counter()
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def cmd_layers(args) -> int:
    from compressor.checkpoint.loading import inventory  # torch

    inv = inventory(args.model, trust_remote_code=get_settings().trust_remote_code)
    if args.json:
        print(json.dumps(inv.to_dict()))
        return 0
    for li in inv.linears:
        print(f"{li.name:<45} {li.out_features:>6} x {li.in_features:<6} block {li.block} {li.kind}")
    print(f"kept: {len(inv.kept)} tensors, {inv.kept_bytes:,} bytes")
    return 0
