"""The scheduler's events into the run's record: the groups timeline, what each group runs now, and the probes
moved (``Recorder``); the results themselves are recorded by their handlers (``pipeline.run.handlers``).

A thin layer on purpose: how the recorder stores an event is the recorder's business."""

from __future__ import annotations

from actors.records import GroupInfo

from .recorder import Recorder
from .scheduler import SchedulerListener


class RecordingListener(SchedulerListener):
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def group_requested(self, index: int, *, replacement: bool) -> None:
        if replacement:  # the first requests are the run's layout, in run.json's config
            self.recorder.group_event(index, "requested", cause="replacement")

    def group_formed(self, index: int, info: GroupInfo) -> None:
        self.recorder.group_event(index, "formed", info=info)

    def group_lost(self, index: int, *, task, lost: bool, cause: str) -> None:
        if task is not None:
            self.recorder.running(index, None)
        self.recorder.group_event(index, "lost" if lost else "failed", cause=cause)

    def task_started(self, index: int, task) -> None:
        self.recorder.running(index, task.label)

    def task_finished(self, index: int, task, result) -> None:
        self.recorder.running(index, None)

    def task_requeued(self, index: int, task) -> None:
        self.recorder.probe_moved()
