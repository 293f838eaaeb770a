"""Profiling: same inputs give the same key; a resumed profile equals an uninterrupted one."""

import dataclasses

import pytest

from compressor.profile import ProfileConfig, run_profile
from compressor.profile_store import FileProfileStore, profile_key
from solver.errormodel import ErrorModel
from tests.service.fixtures import write_tiny_model

CFG = ProfileConfig(calib_seqs=4, seq_len=64, q_bits=(2, 3, 4, 8), anchors=((3, 0.5),))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # a random 2-block Qwen2 with a word-level tokenizer (fast to encode)
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_profile_key_is_stable_and_sensitive():
    a = profile_key("w1", "c1", CFG.to_dict())
    assert a == profile_key("w1", "c1", ProfileConfig.from_dict(CFG.to_dict()).to_dict())
    assert a != profile_key("w2", "c1", CFG.to_dict())
    assert a != profile_key("w1", "c2", CFG.to_dict())
    assert a != profile_key("w1", "c1", dataclasses.replace(CFG, seed=1).to_dict())


def test_profile_contents(tiny_model, tmp_path):
    stages = []
    prof = run_profile(str(tiny_model), FileProfileStore(tmp_path), config=CFG,
                       progress=lambda s, f: stages.append((s, f)))
    assert len(prof.linears) == 14 and prof.stats["num_blocks"] == 2
    assert stages[-1] == ("done", 1.0)
    assert all(0 <= f <= 1 for _, f in stages)
    assert [f for _, f in stages] == sorted(f for _, f in stages)  # progress never goes back
    for lp in prof.linears:
        assert lp.alpha >= 0 and len(lp.samples) == 5
        model = ErrorModel.from_dict(lp.fit)
        assert model.predict(2, 0) > model.predict(4, 0) > model.predict(8, 0)
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
    assert len(store.linear_records(full.key)) == 6 and store.get(full.key) is None
    resumed = run_profile(str(tiny_model), store, config=CFG)
    a, b = full.to_dict(), resumed.to_dict()
    a["stats"].pop("wall_s"), b["stats"].pop("wall_s")
    for d in (a, b):
        for k in ("sampling_s", "probe_s"):
            d["stats"].pop(k)
    assert a == b
