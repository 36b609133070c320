"""Groups and the work they do: placement requested without blocking, groups formed as the cluster finds room,
a queue of tasks served by whichever group is free, and failures told apart by their cause.

A group slot goes pending (placement group requested) -> loading (ranks created, model loading) -> ready <->
busy. When a group is lost (its node removed or preempted, a rank killed) its task returns to the front of the
queue, where the next free group continues it from its checkpoint, and a replacement is requested; that costs
nothing against ``cluster.max_failures``, which counts only errors raised by a task itself. On an autoscaling
cluster the pending placement groups are what asks the autoscaler for nodes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.group import WorkerGroup
from actors.records import BlockSpectrumTask, BlockTask, GroupInfo, ProbeTask, ProgressEvent

from .output_lock import ensure_held
from .preflight import Prepared, model_spec
from .progress import Progress, log
from .recorder import Recorder
from .signals import Interrupted, as_interrupted

POLL_SECONDS = 0.5
PEER_GRACE_SECONDS = 10.0  # after one rank fails, how long to wait for its peers' fate (a dead peer means a loss)
MAX_LOSSES_PER_TASK = 10  # a task whose group dies this often in a row is failing the node, not being preempted


@dataclass(frozen=True, kw_only=True)
class CalibrationTask:
    """Choose (or assess) eps along ``probe``'s start vector on the first group that forms."""

    probe: ProbeTask
    fixed_eps: float | None
    assess: bool = True  # false: take fixed_eps as it is and only time one gradient

    @property
    def label(self) -> str:
        return "eps calibration"


Task = ProbeTask | BlockTask | BlockSpectrumTask | CalibrationTask


class PlacementTimeout(RuntimeError):
    """Fewer than ``cluster.min_groups`` groups were alive for longer than ``cluster.placement_timeout_seconds``."""


def is_loss(err: BaseException) -> bool:
    """A node or actor lost (not an error of the task itself), from Ray's exception types: the actor died or
    is unreachable, its node or worker process died, or a collective failed because a peer did."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.LocalRayletDiedError,
            rex.ObjectLostError, rex.OwnerDiedError)
    if isinstance(err, lost):
        return True
    return isinstance(err, rex.RayTaskError) and isinstance(err.cause, torch.distributed.DistError)


@dataclass
class Slot:
    index: int
    group: WorkerGroup
    state: str = "pending"  # pending | loading | ready | busy
    refs: list = field(default_factory=list)
    task: Task | None = None
    info: GroupInfo | None = None
    kept_probe: int | None = None  # the probe whose first HVP this group holds from the calibration


class Scheduler:
    """Runs a queue of tasks over up to ``cluster.num_groups`` groups; ``on_result(task, result)`` is called in
    the driver's thread for each finished task and may add tasks to the queue."""

    def __init__(self, *, prepared: Prepared, recorder: Recorder, batches_ref: Any, progress: Progress,
                 cancel: threading.Event | None = None, own_ray: bool = True):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.prepared, self.recorder, self.batches_ref = prepared, recorder, batches_ref
        self.cluster = prepared.config.cluster
        self.min_groups = prepared.config.min_groups()
        self.progress, self.cancel, self.own_ray = progress, cancel, own_ray
        # on the driver's node: a worker node may be removed, and the progress queue with it
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.queue: deque[Task] = deque()
        self.failures = 0
        self.losses: dict[str, int] = {}
        self.short_since: float | None = time.monotonic()
        self.slots = [self._request(i) for i in range(self.cluster.num_groups)]

    # -- groups ----------------------------------------------------------------------------------------------
    def _request(self, index: int) -> Slot:
        group = WorkerGroup(index=index, num_workers=self.cluster.num_workers, use_gpu=self.cluster.use_gpu,
                            cpus_per_worker=self.prepared.worker_cpus(), resources=self.cluster.worker_resources)
        return Slot(index=index, group=group, refs=[group.placed])

    def alive(self) -> int:
        return sum(s.state in ("ready", "busy") for s in self.slots)

    def _placed(self, slot: Slot) -> None:
        slot.refs = slot.group.start(spec=model_spec(self.prepared), batches_ref=self.batches_ref,
                                     timeout_seconds=self.cluster.collective_timeout_seconds)
        slot.state = "loading"

    def _formed(self, slot: Slot, infos: list[GroupInfo]) -> None:
        slot.info = WorkerGroup.merge_infos(infos)
        slot.state, slot.refs = "ready", []
        self.recorder.group_event(slot.index, "formed", info=slot.info)
        log(f"group {slot.index} formed: {slot.info.num_workers} worker(s) on node(s) "
            f"{', '.join(sorted({n[:8] for n in slot.info.nodes}))}, model loaded in {slot.info.load_seconds:.1f}s "
            f"({slot.info.num_params:,} parameters); {self.alive()} group(s) alive")

    def _lost(self, slot: Slot, errors: list[BaseException]) -> None:
        """Kill the group, requeue its task, request a replacement; raise if the task itself failed too often."""
        loss = any(is_loss(e) for e in errors)
        task, state = slot.task, slot.state
        slot.group.shutdown(graceful=False)
        if task is not None:
            self.recorder.running(slot.index, None)
        cause = type(next((e for e in errors if is_loss(e)), errors[0])).__name__
        self.recorder.group_event(slot.index, "lost" if loss else "failed", cause=cause)
        if not loss and (state == "loading" or isinstance(task, CalibrationTask)
                         or isinstance(getattr(errors[0], "cause", errors[0]), FloatingPointError)
                         or self.failures >= self.cluster.max_failures):
            raise next(e for e in errors if not is_loss(e))
        if not loss:
            self.failures += 1
        what = f" during {task.label}" if task is not None else ""
        kind = "was lost" if loss else f"failed ({self.failures}/{self.cluster.max_failures})"
        log(f"group {slot.index} {kind}{what}: {cause}; requesting a replacement")
        if task is not None:
            key = task.label
            self.losses[key] = self.losses.get(key, 0) + int(loss)
            if self.losses[key] > MAX_LOSSES_PER_TASK:
                raise RuntimeError(f"{task.label} lost its group {self.losses[key]} times; giving up") from errors[0]
            self.queue.appendleft(task)
            self.recorder.probe_moved()
        self.slots[self.slots.index(slot)] = self._request(slot.index)
        self.recorder.group_event(slot.index, "requested", cause="replacement")

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, on_result: Callable[[Task, Any, Slot], None]) -> None:
        """Until the queue is empty and no task runs."""
        while self.queue or any(s.state == "busy" for s in self.slots):
            self._check_cancel()
            refs = [r for s in self.slots for r in s.refs]
            if refs:
                import ray

                ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
            else:
                time.sleep(POLL_SECONDS)
            self._drain_progress()
            for slot in list(self.slots):
                self._advance(slot, on_result)
            self._dispatch()
            self._check_alive()

    def _advance(self, slot: Slot, on_result) -> None:
        import ray

        if not slot.refs:
            return
        ready, _ = ray.wait(slot.refs, num_returns=len(slot.refs), timeout=0)
        if not ready:
            return
        results, errors = self._collect(ready)
        if errors and len(ready) < len(slot.refs) and not any(is_loss(e) for e in errors):
            # one rank failed while its peers still run: if a peer died, this is a loss, not an error
            ready, _ = ray.wait(slot.refs, num_returns=len(slot.refs), timeout=PEER_GRACE_SECONDS)
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
            task, slot.task, slot.state, slot.refs = slot.task, None, "ready", []
            self.losses.pop(task.label, None)
            self.recorder.running(slot.index, None)
            if isinstance(task, CalibrationTask):
                slot.kept_probe = task.probe.probe_id if results[0].first_matvec_kept else None
            on_result(task, results[0], slot)

    @staticmethod
    def _collect(refs) -> tuple[list, list[BaseException]]:
        import ray

        results, errors = [], []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - classified by type in _lost
                errors.append(e)
        return results, errors

    def _dispatch(self) -> None:
        free = [s for s in self.slots if s.state == "ready"]
        while self.queue and free:
            task = self.queue.popleft()
            probe_id = getattr(task, "probe_id", None)
            slot = next((s for s in free if isinstance(task, ProbeTask) and s.kept_probe == probe_id), free[0])
            free.remove(slot)
            slot.task, slot.state, slot.kept_probe = task, "busy", None
            self.recorder.running(slot.index, task.label)
            if isinstance(task, CalibrationTask):
                self.recorder.phase("calibration")
                slot.refs = slot.group.calibrate(task.probe, fixed_eps=task.fixed_eps, assess=task.assess)
            elif isinstance(task, ProbeTask):
                self.recorder.clear_unfinished_checkpoint(task.probe_id)
                slot.refs = slot.group.run_probe(task, progress=self._progress_sink())
            elif isinstance(task, BlockSpectrumTask):
                slot.refs = slot.group.run_block_spectrum(task)
            else:
                slot.refs = slot.group.run_blocks(task)

    def _progress_sink(self):
        actor = self.events.actor

        def progress(event: ProgressEvent) -> None:
            # fire and forget: a blocking put would hold rank 0 (and so its group) for a round trip every step
            actor.put_nowait.remote(event)

        return progress

    def _drain_progress(self) -> None:
        pending = self.events.qsize()
        self.progress.set_groups(self.alive(), len(self.slots))
        for event in self.events.get_nowait_batch(pending) if pending else []:  # two round trips, not one a step
            self.progress.update(probe_id=event.probe_id, step=event.step, steps=event.steps,
                                 hvp_seconds=event.hvp_seconds)

    def _check_alive(self) -> None:
        """Fail after placement_timeout_seconds with fewer than min_groups groups placed (loading counts: the
        timeout is about the cluster's room, not about how long a model takes to load)."""
        placed = sum(s.state != "pending" for s in self.slots)
        if placed >= self.min_groups:
            self.short_since = None
            return
        now = time.monotonic()
        if self.short_since is None:
            self.short_since = now
        elif now - self.short_since > self.cluster.placement_timeout_seconds:
            bundle = self.slots[0].group.bundle
            raise PlacementTimeout(
                f"only {placed} of cluster.min_groups={self.min_groups} group(s) could be placed for "
                f"{self.cluster.placement_timeout_seconds:g}s (each needs {self.cluster.num_workers} worker(s) with "
                f"{bundle}); checkpoints are kept: run the same command again to resume")

    def _check_cancel(self) -> None:
        """Stop at a cancel (the sweep's), a Ray the sweep shut down, or a lock another run took over."""
        import ray

        ensure_held(self.recorder.out)
        if self.cancel is not None and self.cancel.is_set():
            reason = getattr(self.cancel, "reason", None)  # the sweep's own Interrupted, naming the signal
            stop = as_interrupted(reason if isinstance(reason, KeyboardInterrupt) else KeyboardInterrupt())
            raise Interrupted(stop.signum)  # a new one per point: the points' threads raise it at once
        if not self.own_ray and not ray.is_initialized():
            raise RuntimeError("Ray was shut down by the sweep running this run")

    def shutdown(self, *, graceful: bool) -> None:
        import ray

        for slot in self.slots:
            if not ray.is_initialized():  # a call now would start a new local Ray (auto-init)
                break
            try:  # busy ranks are in a probe: kill them rather than queue a shutdown behind it
                slot.group.shutdown(graceful=graceful and slot.state != "busy")
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
