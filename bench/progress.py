"""A long bench stage's (stage, fraction) callbacks as stderr lines, so a run of many minutes is
never silent: one line per change of stage kind or per 2 % done."""

from __future__ import annotations

import time
from collections.abc import Callable


class StageProgress:
    def __init__(self, say: Callable[[str], None], what: str) -> None:
        self.say, self.what = say, what
        self.kind, self.frac, self.t0 = None, -1.0, time.perf_counter()

    def __call__(self, stage: str, frac: float) -> None:
        stage = stage.removeprefix(self.what + " ")
        kind = stage.split()[0] if stage else ""
        if kind != self.kind or frac - self.frac >= 0.02 or (frac >= 1 > self.frac):
            self.kind, self.frac = kind, frac
            self.say(f"{self.what}: {stage} {100 * frac:.0f}% "
                     f"({time.perf_counter() - self.t0:.0f} s)")
