"""Profiling: same inputs give the same key; a resumed profile equals an uninterrupted one."""

import dataclasses

import pytest

from compressor.pipeline.profile import ProfileConfig, partial_key, run_profile
from compressor.pipeline.profile_store import FileProfileStore, profile_key
from solver.bytes import Option
from solver.errormodel import ErrorModel

CFG = ProfileConfig(calib_seqs=4, seq_len=64, q_bits=(2, 3, 4, 8), anchors=((3, 0.5),))


def test_profile_key_is_stable_and_sensitive():
    a = profile_key("w1", "c1", CFG.to_dict())
    assert a == profile_key("w1", "c1", ProfileConfig.from_dict(CFG.to_dict()).to_dict())
    assert a != profile_key("w2", "c1", CFG.to_dict())
    assert a != profile_key("w1", "c2", CFG.to_dict())
    assert a != profile_key("w1", "c1", dataclasses.replace(CFG, seed=1).to_dict())
    assert a != profile_key("w1", "c1", dataclasses.replace(CFG, extra_groups=()).to_dict())
    with pytest.raises(ValueError, match="group_bits"):
        ProfileConfig(q_bits=(2, 3, 6), group_bits=(2, 4))
    with pytest.raises(ValueError, match="at least 3 bit widths"):   # a Q-alone fit needs 3
        ProfileConfig(q_bits=(2, 4), group_bits=(2, 4))


def test_profile_contents(tiny_model, tmp_path):
    stages = []
    prof = run_profile(str(tiny_model), FileProfileStore(tmp_path), config=CFG,
                       progress=lambda s, f: stages.append((s, f)))
    # 2 blocks × 7 linears, and the tied embedding (first: one item, embedding and head)
    assert len(prof.linears) == 14 + 1 and prof.stats["num_blocks"] == 2
    emb = prof.linears[0]
    assert (emb.name, emb.block, emb.out_features, emb.in_features) == (
        "model.embed_tokens", None, 264, 32)
    assert all(lp.block is not None for lp in prof.linears[1:])
    assert stages[-1] == ("done", 1.0)
    assert all(0 <= f <= 1 for _, f in stages)
    assert [f for _, f in stages] == sorted(f for _, f in stages)  # progress never goes back
    for lp in prof.linears:
        # 4 Q-only samples, and the blocks' linears one anchor (3 bits, rank 0.5·min dim);
        # the embedding is Q alone (a lookup takes no L·R)
        assert lp.alpha >= 0 and len(lp.samples) == (5 if lp.block is not None else 4)
        assert [s[:2] for s in lp.samples if s[1] == 0] == [[b, 0] for b in CFG.q_bits]
        model = ErrorModel.from_dict(lp.fit)
        assert model.predict(2, 0) > model.predict(4, 0) > model.predict(8, 0)
        # group sizes the planner may choose: the profiled one (κ = 1) and the larger ones,
        # measured at group_bits; fewer scales never make Q more accurate (allow LDLQ noise)
        assert model.groups() == [128, 256, 512]
        assert [b for b, _ in lp.fit["group_factors"]["512"]] == list(CFG.group_bits)
        assert all(k == 1.0 for _, k in lp.fit["group_factors"]["128"])
        assert all(0.9 < k < 10 for g in ("256", "512") for _, k in lp.fit["group_factors"][g])
    # the planner's menu offers every profiled group; errors scale by κ_g(b)
    from compressor.pipeline.planning import MenuConfig, build_problem, predicted_kl

    menus = build_problem(prof).linears
    assert [m.name for m in menus] == [lp.name for lp in prof.linears]
    assert {o.rank for o in menus[0].options} == {0}          # the embedding: Q alone
    assert max(o.rank for o in menus[1].options) > 0
    menu = menus[1]
    lp = prof.linear(menu.name)
    err = {(o.bits, o.rank, o.group_size): e for o, e in zip(menu.options, menu.errors, strict=True)}
    assert {g for _, _, g in err} == {128, 256, 512}
    k = ErrorModel.from_dict(lp.fit).group_factor(2, 512)
    assert err[(2, 0, 512)] == pytest.approx(err[(2, 0, 128)] * k)
    emb_err = {(o.bits, o.group_size): e for o, e in zip(menus[0].options, menus[0].errors,
                                                         strict=True)}
    assert {g for _, g in emb_err} == {128, 256, 512}
    assert emb_err[(2, 512)] == pytest.approx(
        emb_err[(2, 128)] * ErrorModel.from_dict(emb.fit).group_factor(2, 512))
    only = build_problem(prof, menu=MenuConfig(all_groups=False)).linears
    assert {o.group_size for m in only[:2] for o in m.options} == {128}
    wide = {x.name: Option(2, 0, 4, 512) for x in prof.linears}
    narrow = {x.name: Option(2, 0, 4, 128) for x in prof.linears}
    assert predicted_kl(prof, wide) == pytest.approx(sum(
        x.alpha * float(ErrorModel.from_dict(x.fit).predict(2, 0, 512)) for x in prof.linears))
    assert predicted_kl(prof, narrow) > 0
    # stored and returned again without recomputing
    again = run_profile(str(tiny_model), FileProfileStore(tmp_path), config=CFG)
    assert again.to_dict() == prof.to_dict()


def test_resumed_profile_equals_uninterrupted(tiny_model, tmp_path):
    full = run_profile(str(tiny_model), FileProfileStore(tmp_path / "a"), config=CFG)

    class Killed(Exception):
        pass

    store = FileProfileStore(tmp_path / "b")
    seen = []

    def die_midway(stage, frac):
        if stage == "linears":
            seen.append(frac)
            if len(seen) == 6:
                raise Killed

    with pytest.raises(Killed):
        run_profile(str(tiny_model), store, config=CFG, progress=die_midway)
    # sampled linears wait for their α (known when their probe stream meets the head) under
    # the partial key; none is complete yet
    assert len(store.linear_records(partial_key(full.key))) == 6
    assert not store.linear_records(full.key) and store.get(full.key) is None
    resumed = run_profile(str(tiny_model), store, config=CFG)
    a, b = full.to_dict(), resumed.to_dict()
    a["stats"].pop("wall_s"), b["stats"].pop("wall_s")
    for d in (a, b):
        for k in ("sampling_s", "probe_s", "stage_s", "peak_rss_bytes", "stage_peak_rss_bytes"):
            d["stats"].pop(k)
    assert a == b


def test_spearman_equals_scipy_with_ties():
    import numpy as np
    from scipy.stats import spearmanr

    from compressor.pipeline.profile import spearman

    rng = np.random.default_rng(0)
    for t in range(100):
        n = int(rng.integers(3, 30))
        a = rng.integers(0, 4, n).astype(float) if t % 2 else rng.normal(size=n)
        b = rng.normal(size=n)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None   # constant: undefined
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None             # too few
