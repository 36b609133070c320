"""What the driver does with each kind of task: one handler per task type (and so per result type), in one
registry. ``finished`` takes a task's result in (records it, logs it, may queue more tasks); ``started``, if
any, prepares for the task just before a group runs it.

The package's own handlers are registered by ``pipeline.run.driver``; a new kind of task registers its own with
``register`` (a test does, for a task defined outside the package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .scheduler import SchedulerListener


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a handler works with: the run's prepared config, its recorder, and its scheduler (``submit``)."""

    prepared: Any  # pipeline.run.preflight.Prepared
    recorder: Any  # pipeline.run.recorder.Recorder
    scheduler: Any  # pipeline.run.scheduler.Scheduler
    probes: Any = None  # pipeline.run.probe_policy.ProbesPolicy: how many SLQ probes (lanczos.probes: auto)


Finished = Callable[[RunContext, Any, Any, int], None]  # (run, task, result, group index)
Started = Callable[[RunContext, Any], None]  # (run, task)


@dataclass(frozen=True, kw_only=True)
class TaskHandler:
    finished: Finished
    started: Started | None = None


HANDLERS: dict[type, TaskHandler] = {}


class UnhandledTask(TypeError):
    """A task of a type for which (nor for any of its bases) no handler is registered."""


def register(task_type: type, *, finished: Finished, started: Started | None = None) -> None:
    """Handle ``task_type``'s results with ``finished`` (and call ``started`` as one starts); replaces an
    earlier registration of the same type."""
    HANDLERS[task_type] = TaskHandler(finished=finished, started=started)


def handler_for(task) -> TaskHandler:
    for kind in type(task).__mro__:
        if kind in HANDLERS:
            return HANDLERS[kind]
    raise UnhandledTask(f"no handler registered for {type(task).__name__} (pipeline.run.handlers.register)")


class ResultHandling(SchedulerListener):
    """The scheduler's listener that hands each task to its registered handler."""

    def __init__(self, run: RunContext):
        self.run = run

    def task_started(self, index: int, task) -> None:
        started = handler_for(task).started
        if started is not None:
            started(self.run, task)

    def task_finished(self, index: int, task, result) -> None:
        handler_for(task).finished(self.run, task, result, index)
