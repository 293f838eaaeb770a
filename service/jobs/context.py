"""What a stage gets and gives back: typed, so stages never reach into the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.db.session import Database
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.queue import Queue


@dataclass
class StageContext:
    db: Database
    settings: Settings
    job_id: str
    queue: Queue | None
    report: Callable[[str, float], None]     # (stage, fraction done 0..1)


@dataclass
class StageResult:
    result: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)          # profile_id / plan_id / artifact_id
    follow_ups: list[tuple[str, str]] = field(default_factory=list)   # (task, job id)
    # not done yet: the job goes back to queued under this stage name while `fan_out`'s header
    # tasks run; the body (the job's own task again) finishes it once they all have
    waiting: str | None = None
    fan_out: tuple[list[tuple[str, str]], tuple[str, str]] | None = None
