"""A group: ``num_workers`` Worker actors in one placement group forming one torch.distributed process group
that holds one FSDP2-sharded copy of the model.

Nothing here blocks: the placement group is requested at construction, ``placed`` is the reference that
resolves once the cluster has room (on an autoscaling cluster a pending placement group is what asks for a
node), ``start`` creates the ranks and returns the references of their setup, and ``execute(task)`` returns one
reference per rank (they run the task together; rank 0's result is the group's).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hessian_core.models import ModelSpec

from .results import GroupInfo
from .tasks import TaskRecord
from .worker import Worker

RemoteWorker = ray.remote(Worker)


class WorkerGroup:
    def __init__(self, *, index: int, num_workers: int, use_gpu: bool, cpus_per_worker: int = 1,
                 resources: dict[str, float] | None = None):
        self.index, self.num_workers, self.use_gpu = index, num_workers, use_gpu
        self.cpus_per_worker = cpus_per_worker
        self.resources = dict(resources or {})
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **self.resources}
        self.bundle = bundle
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        self.workers: list = []
        self.timeout_seconds: float | None = None  # its process group's, set when its ranks are created

    @property
    def placed(self) -> ray.ObjectRef:
        """Resolves once the cluster has reserved the group's resources."""
        return self.pg.ready()

    @property
    def shape(self) -> tuple:
        """What another run needs to take this group as its own: ranks, GPU, CPUs and custom resources per rank,
        and its process group's collective timeout."""
        return (self.num_workers, self.use_gpu, self.cpus_per_worker, tuple(sorted(self.resources.items())),
                self.timeout_seconds)

    def start(self, *, spec: ModelSpec, batches_ref: Any, timeout_seconds: float) -> list[ray.ObjectRef]:
        """Create the ranks in the placed group (or, for a kept group, reuse them and their process group);
        returns their setup references (each resolves to a GroupInfo)."""
        if self.workers:  # a kept group: its ranks load the new model in the process group they formed
            return [w.setup.remote(index=self.index, rendezvous=None, spec=spec, batches=batches_ref,
                                   timeout_seconds=timeout_seconds) for w in self.workers]
        self.timeout_seconds = timeout_seconds
        self.workers = [
            RemoteWorker.options(
                num_cpus=self.cpus_per_worker, num_gpus=1 if self.use_gpu else 0, resources=self.resources,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank=rank, world_size=self.num_workers, use_gpu=self.use_gpu, threads=self.cpus_per_worker)
            for rank in range(self.num_workers)
        ]
        # a reference passed as an argument is resolved before the call runs: no rank waits on the driver
        rendezvous = self.workers[0].rendezvous_address.remote() if self.num_workers > 1 else None
        return [w.setup.remote(index=self.index, rendezvous=rendezvous, spec=spec, batches=batches_ref,
                               timeout_seconds=timeout_seconds) for w in self.workers]

    @staticmethod
    def merge_infos(infos: list[GroupInfo]) -> GroupInfo:
        """One GroupInfo for the group from each rank's."""
        first = infos[0]
        return GroupInfo(index=first.index, num_workers=first.num_workers, num_params=first.num_params,
                         load_seconds=max(i.load_seconds for i in infos),
                         peak_rss_mib_per_rank=[i.peak_rss_mib_per_rank[0] for i in infos],
                         pids=[i.pids[0] for i in infos], nodes=[i.nodes[0] for i in infos],
                         loading_per_rank=[i.loading_per_rank[0] for i in infos],
                         load_memory_per_rank=[i.load_memory_per_rank[0] for i in infos])

    def execute(self, task: TaskRecord, *, progress=None) -> list[ray.ObjectRef]:
        """Run ``task`` on every rank (``Worker.execute``); one reference per rank, rank 0's the group's result.
        ``progress``: where rank 0 reports steps (a picklable callable)."""
        return [w.execute.remote(task, progress=progress) for w in self.workers]

    def shutdown(self, *, graceful: bool = True) -> None:
        """Destroy the process group on every rank (all at once, 10 s at most), then kill the actors.

        ``graceful=False`` kills at once: a rank busy in a long call would only take the shutdown after it."""
        if graceful and self.workers:
            refs = [w.shutdown.remote() for w in self.workers]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=10)
            except Exception:  # noqa: BLE001 - a dead rank: killing it below is all that is left to do
                pass
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001 - the GCS may already have dropped it with a lost node
            pass


def rank0(refs: list[ray.ObjectRef]) -> Any:
    """Wait for every rank's call; rank 0's result, or the first rank's error."""
    return ray.get(refs)[0]
