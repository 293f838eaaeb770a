"""The database-backed ProfileStore (same interface as compressor.pipeline.profile_store's file store).

Profiles are shared by every team and unique on their key; sensitivities, error samples and fitted
error models are unique per (profile, linear). Every write is an upsert, so a resumed or
redelivered profiling run never duplicates rows.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from compressor.pipeline.profile_store import LinearProfile, Profile
from service.db.models import (
    ErrorModel,
    ErrorSamples,
    LinearSensitivity,
    ProfileRow,
    new_id,
    utcnow,
)
from service.db.session import Database
from service.db.upsert import upsert

_PROFILE_FIELDS = ("model_ref", "weights_hash", "calib_hash", "config", "fixed_bytes",
                   "block_sensitivity", "block_proxy", "stats")


class DbProfileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- rows ---------------------------------------------------------------------------------
    def _ensure_row(self, s: Session, key: str) -> str:
        upsert(s, ProfileRow.__table__,
               [{"id": new_id(), "key": key, "config": {}, "fixed_bytes": 0, "linear_order": [],
                 "block_sensitivity": [], "block_proxy": [], "stats": {}, "complete": False,
                 "created_at": utcnow()}], keys=["key"], update_cols=[])
        return s.scalar(select(ProfileRow.id).where(ProfileRow.key == key))

    def _put_linears(self, s: Session, profile_id: str, records: list[LinearProfile]) -> None:
        if not records:
            return
        for r in records:
            check_finite(r)
        upsert(s, LinearSensitivity.__table__, [
            {"profile_id": profile_id, "linear": r.name, "block": r.block,
             "out_features": r.out_features, "in_features": r.in_features,
             "alpha": float(r.alpha), "proxy": float(r.proxy)} for r in records],
            keys=["profile_id", "linear"])
        upsert(s, ErrorSamples.__table__, [
            {"profile_id": profile_id, "linear": r.name, "samples": r.samples,
             "n_samples": len(r.samples)} for r in records], keys=["profile_id", "linear"])
        upsert(s, ErrorModel.__table__, [
            {"profile_id": profile_id, "linear": r.name, "fit": r.fit, "r2": _r2(r.fit)}
            for r in records], keys=["profile_id", "linear"])

    def _load_linears(self, s: Session, profile_id: str) -> dict[str, LinearProfile]:
        sens = s.execute(select(LinearSensitivity).where(
            LinearSensitivity.profile_id == profile_id)).scalars().all()
        samples = dict(s.execute(select(ErrorSamples.linear, ErrorSamples.samples).where(
            ErrorSamples.profile_id == profile_id)).all())
        fits = dict(s.execute(select(ErrorModel.linear, ErrorModel.fit).where(
            ErrorModel.profile_id == profile_id)).all())
        return {r.linear: LinearProfile(
            name=r.linear, block=r.block, out_features=r.out_features,
            in_features=r.in_features, alpha=r.alpha, proxy=r.proxy,
            samples=samples.get(r.linear, []), fit=fits.get(r.linear, {})) for r in sens}

    # -- ProfileStore -------------------------------------------------------------------------
    def get(self, key: str) -> Profile | None:
        with self.db.session() as s:
            row = s.scalar(select(ProfileRow).where(ProfileRow.key == key,
                                                    ProfileRow.complete.is_(True)))
            if row is None:
                return None
            return self.to_profile(s, row)

    def to_profile(self, s: Session, row: ProfileRow) -> Profile:
        recs = self._load_linears(s, row.id)
        order = row.linear_order or sorted(recs)
        return Profile(key=row.key, model_ref=row.model_ref or "",
                       weights_hash=row.weights_hash or "", calib_hash=row.calib_hash or "",
                       config=row.config, fixed_bytes=row.fixed_bytes,
                       linears=[recs[n] for n in order if n in recs],
                       block_sensitivity=list(row.block_sensitivity),
                       block_proxy=list(row.block_proxy), stats=dict(row.stats))

    def put(self, profile: Profile) -> None:
        with self.db.session() as s:
            pid = self._ensure_row(s, profile.key)
            self._put_linears(s, pid, profile.linears)
            values = {f: getattr(profile, f) for f in _PROFILE_FIELDS}
            for f in ("block_sensitivity", "block_proxy"):
                if not _finite(values[f]):
                    raise CorruptRecord(f"profile {profile.key}: non-finite {f}")
            values["stats"] = _nan_to_none(values["stats"])   # JSON has no NaN
            values["target"] = profile_target(profile.config)
            s.execute(update(ProfileRow).where(ProfileRow.id == pid).values(
                **values, linear_order=[lp.name for lp in profile.linears], complete=True,
                completed_at=utcnow()))

    def linear_records(self, key: str) -> dict[str, LinearProfile]:
        with self.db.session() as s:
            pid = s.scalar(select(ProfileRow.id).where(ProfileRow.key == key))
            return self._load_linears(s, pid) if pid else {}

    def put_linear(self, key: str, record: LinearProfile) -> None:
        with self.db.session() as s:
            self._put_linears(s, self._ensure_row(s, key), [record])

    # -- service helpers ----------------------------------------------------------------------
    def link_model(self, key: str, model_id: str) -> str | None:
        with self.db.session() as s:
            s.execute(update(ProfileRow).where(ProfileRow.key == key)
                      .values(model_id=model_id))
            return s.scalar(select(ProfileRow.id).where(ProfileRow.key == key))

    def get_by_id(self, profile_id: str) -> Profile | None:
        """A complete profile by row id. Complete profiles never change (same key, same
        content), so they are cached in-process: a cached-profile plan request reads no rows."""
        ck = (self.db.url, profile_id)
        with _CACHE_LOCK:
            hit = _CACHE.get(ck)
            if hit is not None:
                _CACHE.move_to_end(ck)
                return hit
        with self.db.session() as s:
            row = s.get(ProfileRow, profile_id)
            prof = self.to_profile(s, row) if row is not None and row.complete else None
        if prof is not None:
            with _CACHE_LOCK:
                _CACHE[ck] = prof
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
        return prof


_CACHE: OrderedDict[tuple[str, str], Profile] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 16


def profile_target(config: dict | None) -> str:
    """A profile's target from its config: ProfileConfig.to_dict() names it only for gguf."""
    return str((config or {}).get("target") or "native")


class CorruptRecord(ValueError):
    """A record with NaN/inf numbers: refused, so the store never holds corrupt rows."""


def _finite(x: object) -> bool:
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return True
    if isinstance(x, int | float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list | tuple):
        return all(_finite(v) for v in x)
    return True


def _nan_to_none(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def check_finite(r: LinearProfile) -> None:
    for what, value in (("sensitivity alpha", r.alpha), ("proxy", r.proxy),
                        ("error samples", r.samples), ("fitted error model", r.fit)):
        if not _finite(value):
            raise CorruptRecord(f"linear {r.name}: non-finite {what} (NaN/inf weights or "
                                "activations in the model?); nothing was stored for it")


def _r2(fit: dict) -> float | None:
    for k in ("r2_heldout", "r2", "heldout_r2"):
        v = fit.get(k) if isinstance(fit, dict) else None
        if isinstance(v, int | float):
            return float(v)
    return None
