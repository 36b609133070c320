"""The scheduler's groups on Ray (``pipeline.run.scheduler.GroupBackend``): WorkerGroups of the run's layout, Ray's
waits, its exception types told apart into losses and task errors, and the progress queue on the driver's node."""

from __future__ import annotations

import time
from typing import Any

import torch

from actors.group import WorkerGroup
from actors.records import ProgressEvent

from .preflight import Prepared, model_spec


def is_loss(err: BaseException) -> bool:
    """A node or actor lost (not an error of the task itself), from Ray's exception types: the actor died or
    is unreachable, its node or worker process died, or a collective failed because a peer did."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.LocalRayletDiedError,
            rex.ObjectLostError, rex.OwnerDiedError)
    if isinstance(err, lost):
        return True
    return isinstance(err, rex.RayTaskError) and isinstance(err.cause, torch.distributed.DistError)


class RayGroups:
    """Groups of ``cluster.num_workers`` ranks holding the prepared run's model, each fed ``batches_ref``.
    ``own_ray=False`` (a sweep's point): a Ray that the sweep shut down stops the run."""

    def __init__(self, prepared: Prepared, *, batches_ref: Any, own_ray: bool = True):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.prepared, self.batches_ref, self.own_ray = prepared, batches_ref, own_ray
        self.cluster = prepared.config.cluster
        # on the driver's node: a worker node may be removed, and the progress queue with it
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def request(self, index: int) -> WorkerGroup:
        return WorkerGroup(index=index, num_workers=self.cluster.num_workers, use_gpu=self.cluster.use_gpu,
                           cpus_per_worker=self.prepared.worker_cpus(), resources=self.cluster.worker_resources)

    def start(self, group: WorkerGroup) -> list:
        return group.start(spec=model_spec(self.prepared), batches_ref=self.batches_ref,
                           timeout_seconds=self.cluster.collective_timeout_seconds)

    merge_infos = staticmethod(WorkerGroup.merge_infos)
    is_loss = staticmethod(is_loss)

    def wait(self, handles: list, *, num_returns: int, timeout: float) -> tuple[list, list]:
        import ray

        if not handles:
            time.sleep(timeout)
            return [], []
        return ray.wait(handles, num_returns=num_returns, timeout=timeout)

    def get(self, handle) -> Any:
        import ray

        return ray.get(handle)

    def progress_sink(self):
        actor = self.events.actor

        def progress(event: ProgressEvent) -> None:
            # fire and forget: a blocking put would hold rank 0 (and so its group) for a round trip every step
            actor.put_nowait.remote(event)

        return progress

    def drain_progress(self) -> list[ProgressEvent]:
        pending = self.events.qsize()
        return self.events.get_nowait_batch(pending) if pending else []  # two round trips, not one a step

    def check(self) -> None:
        import ray

        if not self.own_ray and not ray.is_initialized():
            raise RuntimeError("Ray was shut down by the sweep running this run")

    def available(self) -> bool:
        import ray

        return ray.is_initialized()


__all__ = ["RayGroups", "is_loss"]
