"""What a profile is, how it is keyed, and the small repository interface that stores it.

A profile depends only on (model weights, calibration set, decomposition/profile config, code
version) — never on the budget — so it is measured once and reused for every plan. Records are
written per linear, so a killed profile run resumes where it stopped. The file store here serves
the CLI; the service stores the same records in its database through the same interface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

PROFILE_CODE_VERSION = "3"   # 2: MSE-clipped quantization grids; 3: embedding and head profiled


@dataclass
class LinearProfile:
    """Everything measured for one linear. `samples` are (bits, rank, rel_err²) triples of the
    H-weighted relative error; `fit` is the fitted error model's serialised form."""

    name: str
    block: int | None
    out_features: int
    in_features: int
    alpha: float = 0.0                  # end-to-end sensitivity: ΔKL ≈ alpha · t², t = rel error
    proxy: float = 0.0                  # cheap proxy sensitivity, reported beside alpha
    samples: list[list[float]] = field(default_factory=list)
    fit: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LinearProfile:
        return cls(**d)


@dataclass
class Profile:
    key: str
    model_ref: str
    weights_hash: str
    calib_hash: str
    config: dict
    fixed_bytes: int                    # every parameter kept uncompressed, at its dtype
    linears: list[LinearProfile]
    block_sensitivity: list[float] = field(default_factory=list)
    block_proxy: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)   # fit R², timings, correlations

    def to_dict(self) -> dict:
        return asdict(self) | {"linears": [lp.to_dict() for lp in self.linears]}

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        d = dict(d)
        d["linears"] = [LinearProfile.from_dict(x) for x in d["linears"]]
        return cls(**d)

    def linear(self, name: str) -> LinearProfile:
        for lp in self.linears:
            if lp.name == name:
                return lp
        raise KeyError(name)


def profile_key(weights_hash: str, calib_hash: str, config: dict,
                code_version: str = PROFILE_CODE_VERSION) -> str:
    """Stable key: same inputs, same key (the model ref is a label, the weights hash decides)."""
    blob = json.dumps({"w": weights_hash, "c": calib_hash, "cfg": config, "v": code_version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ProfileStore(Protocol):
    def get(self, key: str) -> Profile | None: ...
    def put(self, profile: Profile) -> None: ...
    def linear_records(self, key: str) -> dict[str, LinearProfile]: ...
    def put_linear(self, key: str, record: LinearProfile) -> None: ...


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class FileProfileStore:
    """One directory per profile key: profile.json once complete, linears/*.json as they land."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Profile | None:
        path = self._dir(key) / "profile.json"
        return Profile.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def put(self, profile: Profile) -> None:
        _atomic_write(self._dir(profile.key) / "profile.json", json.dumps(profile.to_dict()))

    def linear_records(self, key: str) -> dict[str, LinearProfile]:
        d = self._dir(key) / "linears"
        if not d.is_dir():
            return {}
        recs = (LinearProfile.from_dict(json.loads(p.read_text())) for p in d.glob("*.json"))
        return {r.name: r for r in recs}

    def put_linear(self, key: str, record: LinearProfile) -> None:
        _atomic_write(self._dir(key) / "linears" / f"{record.name}.json",
                      json.dumps(record.to_dict()))

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/profile.json"))


SHIPPED_PROFILE = "bitplan_profile.json"


def seed_shipped_profile(store: ProfileStore, model_path: str | Path) -> bool:
    """Put a profile shipped beside the model (`bitplan_profile.json`, e.g. the demo's) into
    `store`. run_profile uses it only if its key matches what it computes from these weights,
    calibration set, config and code version. False when there is none or it is unreadable."""
    shipped = Path(model_path) / SHIPPED_PROFILE
    if not shipped.is_file():
        return False
    try:
        prof = Profile.from_dict(json.loads(shipped.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring the profile shipped at %s: %s", shipped, exc)
        return False
    if store.get(prof.key) is None:
        store.put(prof)
    return True
