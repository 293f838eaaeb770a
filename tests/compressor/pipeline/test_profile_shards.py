"""Profiling in block-range shards (what the job queue's profile shards run) gives exactly the
records and profile of one sweep over every block: each shard streams the earlier blocks forward
itself, samples only its own linears and carries their probes to the head."""

from __future__ import annotations

import math

import pytest

from bench.streaming_baseline import CONFIG
from compressor.pipeline.profile import (
    assemble_profile,
    open_profile,
    run_profile,
    shard_ranges,
    sweep_blocks,
)
from compressor.pipeline.profile_store import FileProfileStore
from tests.helpers.models import write_tiny_model


@pytest.mark.parametrize("blocks,shards,want", [
    (12, 2, [(0, 6), (6, 12)]), (5, 3, [(0, 2), (2, 3), (3, 5)]), (3, 8, [(0, 1), (1, 2), (2, 3)]),
    (4, 1, [(0, 4)]), (1, 0, [(0, 1)])])
def test_shard_ranges_cover_every_block_once(blocks, shards, want):
    got = shard_ranges(blocks, shards)
    assert [(r.start, r.stop) for r in got] == want
    assert [j for r in got for j in r] == list(range(blocks))


def test_sharded_profile_equals_one_sweep(tmp_path):
    tiny = str(write_tiny_model(tmp_path / "tiny", layers=3))
    whole = run_profile(tiny, FileProfileStore(tmp_path / "one"), config=CONFIG)

    store = FileProfileStore(tmp_path / "shards")
    influence = [math.nan] * 3
    for blocks in reversed(shard_ranges(3, 2)):   # any order: shards run on different workers
        src = open_profile(tiny, CONFIG, weights_hash=whole.weights_hash)
        before = set(store.linear_records(src.key))
        sweep = sweep_blocks(src.sm, src.calib, CONFIG, src.key, store, src.inventory, blocks)
        for j in blocks:
            influence[j] = sweep.block_influence[j]
        # a shard measures only its own linears; the one holding the last block also the
        # embedding (tied here: one item), exactly once over the shards
        added = store.linear_records(src.key).keys() - before
        vocab = {"model.embed_tokens"} if blocks.stop == 3 else set()
        assert {store.linear_records(src.key)[n].block for n in added - vocab} == set(blocks)
        assert added & vocab == vocab
        assert all(store.linear_records(src.key)[n].block is not None for n in added - vocab)
    sharded = assemble_profile(open_profile(tiny, CONFIG), store, influence, {"shards": 2})

    assert sharded.key == whole.key
    assert [lp.to_dict() for lp in sharded.linears] == [lp.to_dict() for lp in whole.linears]
    assert sharded.linears[0].name == "model.embed_tokens" and sharded.linears[0].alpha > 0
    assert sharded.block_proxy == whole.block_proxy
    assert sharded.block_sensitivity == whole.block_sensitivity
    assert sharded.fixed_bytes == whole.fixed_bytes


def test_assembling_with_a_shard_missing_names_it(tmp_path):
    tiny = str(write_tiny_model(tmp_path / "tiny", layers=2))
    store = FileProfileStore(tmp_path / "p")
    src = open_profile(tiny, CONFIG)
    sweep_blocks(src.sm, src.calib, CONFIG, src.key, store, src.inventory, range(0, 1))
    # block 1's 7 linears and the embedding, which the shard holding the last block profiles
    # (the inventory lists the embedding first)
    with pytest.raises(ValueError, match=r"lacks 8 linears \(first: model\.embed_tokens\)"):
        assemble_profile(src, store, [0.0, 0.0], {})
    records = store.linear_records(src.key)
    assert "model.embed_tokens" not in records and not any(
        n.startswith("model.layers.1.") for n in records)
    sweep_blocks(src.sm, src.calib, CONFIG, src.key, store, src.inventory, range(1, 2))
    assert len(assemble_profile(src, store, [0.0, 0.0], {}).linears) == 14 + 1


def test_kl_of_many_streams_is_head_stats_kl_exactly(tmp_path):
    """The probes' KL, all streams against one reference with the head read once
    (sensitivity.kl_to_reference), is bit-for-bit `head_stats`'s KL of each stream alone."""
    import torch

    from compressor.checkpoint.stream import StreamedModel
    from compressor.pipeline.sensitivity import kl_to_reference

    tiny = str(write_tiny_model(tmp_path / "tiny", layers=1))
    sm = StreamedModel(tiny, vocab_chunk=37)          # several chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 32, generator=gen)
    streams = [ref + 0.3 * torch.randn(ref.shape, generator=gen) for _ in range(3)]
    got = kl_to_reference(sm, streams, ref)
    for h, kl in zip(streams, got, strict=True):
        assert torch.equal(kl, sm.head_stats(h, ref=ref).kl)
    assert all((kl > 0).all() for kl in got)
