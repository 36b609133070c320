"""Groups and the work they do: placement requested without blocking, groups formed as the cluster finds room,
a queue of tasks served by whichever group is free, and failures told apart by their cause.

A group slot goes pending (placement group requested) -> loading (ranks created, model loading) -> ready <->
busy. When a group is lost (its node removed or preempted, a rank killed) its task returns to the front of the
queue, where the next free group continues it from its checkpoint, and a replacement is requested; what a
failure costs is ``FailurePolicy``'s decision. On an autoscaling cluster the pending placement groups are what
asks the autoscaler for nodes.

The scheduler knows groups only through ``GroupBackend`` (``pipeline.run.ray_groups.RayGroups`` on Ray; a test's
fake without it) and tells what happens through events to its listeners (``SchedulerListener``): the
recording (``pipeline.run.recording``) and the result handlers (``pipeline.run.handlers``) are listeners.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.records import GroupInfo, ProgressEvent
from actors.tasks import TaskRecord

from .failure_policy import FailureAction, FailurePolicy
from .progress import log as print_log

POLL_SECONDS = 0.5
PEER_GRACE_SECONDS = 10.0  # after one rank fails, how long to wait for its peers' fate (a dead peer means a loss)


class PlacementTimeout(RuntimeError):
    """Fewer than ``cluster.min_groups`` groups were alive for longer than ``cluster.placement_timeout_seconds``."""


class Group(Protocol):
    """One group of ranks (``actors.group.WorkerGroup``); its calls return handles that the backend waits on."""

    index: int
    num_workers: int
    bundle: dict  # the resources of one rank, for the placement timeout's message

    @property
    def placed(self) -> Any: ...

    def execute(self, task: TaskRecord, *, progress: Callable[[ProgressEvent], None] | None = None) -> list: ...

    def shutdown(self, *, graceful: bool = True) -> None: ...


class GroupBackend(Protocol):
    """How the scheduler makes groups, waits on their handles and reads them back."""

    def request(self, index: int) -> Group:
        """A new group whose placement is requested (not waited for)."""

    def start(self, group: Group) -> list:
        """Create the placed group's ranks; one handle per rank, each resolving to that rank's GroupInfo."""

    def merge_infos(self, infos: list[GroupInfo]) -> GroupInfo: ...

    def wait(self, handles: list, *, num_returns: int, timeout: float) -> tuple[list, list]:
        """(ready, not ready) as ``ray.wait``; with no handles, sleeps ``timeout``."""

    def get(self, handle) -> Any:
        """The handle's value, or its error raised."""

    def is_loss(self, error: BaseException) -> bool:
        """The group lost (node, actor or peer gone), not an error of the task itself."""

    def progress_sink(self) -> Callable[[ProgressEvent], None] | None:
        """What a task's rank 0 reports its steps to."""

    def drain_progress(self) -> list[ProgressEvent]: ...

    def release(self, group: Group, *, graceful: bool, idle: bool) -> None:
        """The run is done with ``group``: shut it down (``graceful``: its ranks leave their process group first),
        or, where ``idle`` (formed, no task running) and graceful, a backend may keep it for another run."""

    def close(self) -> None:
        """Release what the backend holds for this run alone (its share of the progress queue)."""

    def check(self) -> None:
        """Raise if the runtime under the groups went away."""

    def available(self) -> bool:
        """Whether the runtime is up (the groups can still be called)."""


class SchedulerListener:
    """Callbacks for what the scheduler does; each is called in the driver's thread, in the order listed at
    construction. Every method is a no-op here: a listener overrides the events it cares about."""

    def group_requested(self, index: int, *, replacement: bool) -> None: ...

    def group_formed(self, index: int, info: GroupInfo) -> None: ...

    def group_lost(self, index: int, *, task: TaskRecord | None, lost: bool, cause: str) -> None:
        """The group is gone (``lost``: a loss, else a failure of ``task`` itself); called before the decision."""

    def task_started(self, index: int, task: TaskRecord) -> None: ...

    def task_finished(self, index: int, task: TaskRecord, result: Any) -> None: ...

    def task_requeued(self, index: int, task: TaskRecord) -> None:
        """``task`` goes back to the front of the queue after its group ``index`` was lost."""


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    num_groups: int
    min_groups: int
    max_failures: int
    placement_timeout_seconds: float
    poll_seconds: float = POLL_SECONDS
    peer_grace_seconds: float = PEER_GRACE_SECONDS


@dataclass(eq=False)  # slots are told apart by identity
class Slot:
    index: int
    group: Group
    state: str = "pending"  # pending | loading | ready | busy
    refs: list = field(default_factory=list)
    task: TaskRecord | None = None
    info: GroupInfo | None = None
    kept: Hashable | None = None  # the affinity key of what this group keeps from its last task


class Scheduler:
    """Runs a queue of tasks over up to ``settings.num_groups`` groups. Listeners hear of every event; one may
    add tasks to the queue (``submit``) when a task finishes. ``checks`` run at every poll and raise to stop."""

    def __init__(self, *, settings: SchedulerSettings, backend: GroupBackend,
                 listeners: Sequence[SchedulerListener] = (), policy: FailurePolicy | None = None,
                 progress=None, checks: Sequence[Callable[[], None]] = (), log: Callable[[str], None] = print_log):
        self.settings, self.backend, self.listeners = settings, backend, list(listeners)
        self.policy = policy or FailurePolicy(max_failures=settings.max_failures, is_loss=backend.is_loss)
        self.progress, self.checks, self.log = progress, list(checks), log
        self.queue: deque[TaskRecord] = deque()
        self.short_since: float | None = time.monotonic()
        self.formed = 0  # slots ready or busy (kept as they change: a count over the slots is O(groups))
        self.slots = [self._request(i, replacement=False) for i in range(settings.num_groups)]

    @property
    def failures(self) -> int:
        """Errors of tasks themselves that the run recovered from (cluster.max_failures counts these)."""
        return self.policy.failures

    def submit(self, tasks) -> None:
        self.queue.extend(tasks)

    def _emit(self, event: str, *args, **kwargs) -> None:
        for listener in self.listeners:
            getattr(listener, event)(*args, **kwargs)

    # -- groups ----------------------------------------------------------------------------------------------
    def _request(self, index: int, *, replacement: bool) -> Slot:
        group = self.backend.request(index)
        self._emit("group_requested", index, replacement=replacement)
        return Slot(index=index, group=group, refs=[group.placed])

    def alive(self) -> int:
        return self.formed

    def _placed(self, slot: Slot) -> None:
        slot.refs = self.backend.start(slot.group)
        slot.state = "loading"

    def _formed(self, slot: Slot, infos: list[GroupInfo]) -> None:
        slot.info = self.backend.merge_infos(infos)
        slot.state, slot.refs = "ready", []
        self.formed += 1
        self._emit("group_formed", slot.index, slot.info)
        self.log(f"group {slot.index} formed: {slot.info.num_workers} worker(s) on node(s) "
                 f"{', '.join(sorted({(n or '')[:8] for n in slot.info.nodes}))}, model loaded in "
                 f"{slot.info.load_seconds:.1f}s ({slot.info.num_params:,} parameters); {self.alive()} group(s) alive")

    def _lost(self, slot: Slot, errors: list[BaseException]) -> None:
        """Kill the group; by the policy's decision, requeue its task and request a replacement, or raise."""
        task, state = slot.task, slot.state
        slot.group.shutdown(graceful=False)
        self.formed -= state in ("ready", "busy")
        lost = any(self.backend.is_loss(e) for e in errors)
        cause = type(next((e for e in errors if self.backend.is_loss(e)), errors[0])).__name__
        self._emit("group_lost", slot.index, task=task, lost=lost, cause=cause)
        decision = self.policy.decide(task=task, errors=errors, loading=state == "loading")
        if decision.action is FailureAction.RAISE:
            raise decision.error
        what = f" during {task.label}" if task is not None else ""
        kind = "was lost" if lost else f"failed ({self.policy.failures}/{self.policy.max_failures})"
        self.log(f"group {slot.index} {kind}{what}: {cause}; requesting a replacement")
        if decision.action is FailureAction.GIVE_UP:
            raise decision.error
        if task is not None:
            self.queue.appendleft(task)
            self._emit("task_requeued", slot.index, task)
        self.slots[self.slots.index(slot)] = self._request(slot.index, replacement=True)

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Until the queue is empty and no task runs."""
        while self.queue or any(s.state == "busy" for s in self.slots):
            self._check()
            self.backend.wait([r for s in self.slots for r in s.refs], num_returns=1,
                              timeout=self.settings.poll_seconds)
            self._drain_progress()
            for slot in list(self.slots):
                self._advance(slot)
            self._dispatch()
            self._check_alive()

    def _advance(self, slot: Slot) -> None:
        if not slot.refs:
            return
        wait = self.backend.wait
        ready, _ = wait(slot.refs, num_returns=len(slot.refs), timeout=0)
        if not ready:
            return
        results, errors = self._collect(ready)
        if errors and len(ready) < len(slot.refs) and not any(self.backend.is_loss(e) for e in errors):
            # one rank failed while its peers still run: if a peer died, this is a loss, not an error
            ready, _ = wait(slot.refs, num_returns=len(slot.refs), timeout=self.settings.peer_grace_seconds)
            results, errors = self._collect(ready)
        if errors:
            self._lost(slot, errors)
            return
        if len(ready) < len(slot.refs):
            return
        if slot.state == "pending":
            self._placed(slot)
        elif slot.state == "loading":
            self._formed(slot, results)
        else:
            self._finished(slot, results[0])

    def _finished(self, slot: Slot, result: Any) -> None:
        task, slot.task, slot.state, slot.refs = slot.task, None, "ready", []
        self.policy.succeeded(task)
        slot.kept = task.kept_affinity(result)
        self._emit("task_finished", slot.index, task, result)

    def _collect(self, refs) -> tuple[list, list[BaseException]]:
        results, errors = [], []
        for ref in refs:
            try:
                results.append(self.backend.get(ref))
            except Exception as e:  # noqa: BLE001 - classified by type in the failure policy
                errors.append(e)
        return results, errors

    def _dispatch(self) -> None:
        if not self.queue:
            return
        ready = [s for s in self.slots if s.state == "ready"]
        keeping = {s.kept: s for s in ready if s.kept is not None}
        # a task with no state kept for it takes a group that keeps none before one that keeps some
        free = deque([s for s in ready if s.kept is None] + list(keeping.values()))
        sink = self.backend.progress_sink() if free else None
        while self.queue:
            task = self.queue[0]
            slot = keeping.pop(task.affinity, None) if task.affinity is not None else None
            if slot is None or slot.state != "ready":  # none keeps its state, or that one took an earlier task
                slot = _next_ready(free)
                if slot is None:
                    return
            self.queue.popleft()
            slot.task, slot.state, slot.kept = task, "busy", None
            self._emit("task_started", slot.index, task)
            slot.refs = slot.group.execute(task, progress=sink)

    def _drain_progress(self) -> None:
        if self.progress is None:
            return
        self.progress.set_groups(self.alive(), len(self.slots))
        for event in self.backend.drain_progress():
            self.progress.update(probe_id=event.probe_id, step=event.step, steps=event.steps,
                                 hvp_seconds=event.hvp_seconds)

    def _check(self) -> None:
        for check in self.checks:
            check()
        self.backend.check()

    def _check_alive(self) -> None:
        """Fail after placement_timeout_seconds with fewer than min_groups groups placed (loading counts: the
        timeout is about the cluster's room, not about how long a model takes to load)."""
        placed = sum(s.state != "pending" for s in self.slots)
        if placed >= self.settings.min_groups:
            self.short_since = None
            return
        now = time.monotonic()
        if self.short_since is None:
            self.short_since = now
        elif now - self.short_since > self.settings.placement_timeout_seconds:
            settings, group = self.settings, self.slots[0].group
            raise PlacementTimeout(
                f"only {placed} of cluster.min_groups={settings.min_groups} group(s) could be placed for "
                f"{settings.placement_timeout_seconds:g}s (each needs {group.num_workers} worker(s) with "
                f"{group.bundle}); checkpoints are kept: run the same command again to resume")

    def shutdown(self, *, graceful: bool) -> None:
        self.backend.close()
        for slot in self.slots:
            if not self.backend.available():  # a call now could start a new runtime (Ray's auto-init)
                break
            try:  # busy ranks are in a task: kill them rather than queue a shutdown behind it
                self.backend.release(slot.group, graceful=graceful and slot.state != "busy",
                                     idle=slot.state == "ready")
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def _next_ready(free: deque[Slot]) -> Slot | None:
    while free:
        slot = free.popleft()
        if slot.state == "ready":
            return slot
    return None
