"""The one task registry: task name → queue → job kind → stage. The runner, both queues,
submit, the sweeper and the Celery workers all read it; nobody spells a task name by hand.

Stages are named by module path and imported on first use (`stage_of`): they pull in torch and
the compressor, which the API process — it only enqueues by name — must never import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from service.db.models import JobKind


class Task(StrEnum):
    PROFILE = "bitplan.profile"
    PROFILE_SHARD = "bitplan.profile_shard"
    FIT = "bitplan.fit"
    SOLVE = "bitplan.solve"
    COMPRESS = "bitplan.compress"


class QueueName(StrEnum):
    GPU = "gpu"     # model work: profile, compress
    CPU = "cpu"     # numbers only: fit, solve


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    queue: QueueName
    kind: JobKind
    stage_name: str     # what the job's stage reads while it runs
    stage: str          # "module:function" of the stage, imported when first run


TASKS: dict[Task, TaskSpec] = {spec.task: spec for spec in (
    TaskSpec(Task.PROFILE, QueueName.GPU, JobKind.PROFILE, "profile",
             "service.jobs.stages.profile:profile_stage"),
    TaskSpec(Task.PROFILE_SHARD, QueueName.GPU, JobKind.PROFILE_SHARD, "profile shard",
             "service.jobs.stages.profile:shard_stage"),
    TaskSpec(Task.FIT, QueueName.CPU, JobKind.FIT, "fit",
             "service.jobs.stages.profile:fit_stage"),
    TaskSpec(Task.SOLVE, QueueName.CPU, JobKind.PLAN, "solve",
             "service.jobs.stages.solve:solve_stage"),
    TaskSpec(Task.COMPRESS, QueueName.GPU, JobKind.COMPRESS, "compress",
             "service.jobs.stages.compress:compress_stage"),
)}
TASK_OF_KIND: dict[str, Task] = {spec.kind: spec.task for spec in TASKS.values()}


def spec_of(task_name: str) -> TaskSpec:
    """The spec of a task name; ValueError for a name that is not ours."""
    try:
        return TASKS[Task(task_name)]
    except ValueError:
        raise ValueError(f"unknown task {task_name!r}") from None


def stage_of(task_name: str) -> Callable[..., object]:
    """The stage function (StageContext → StageResult) of a task name."""
    module, _, func = spec_of(task_name).stage.partition(":")
    return getattr(importlib.import_module(module), func)
