"""A group: ``num_workers`` Worker actors in one placement group forming one torch.distributed process group
that holds one FSDP2-sharded copy of the model. Every call fans out to all ranks; rank 0's result is returned."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .model_loading import ModelSpec
from .worker import Worker

RemoteWorker = ray.remote(Worker)


class WorkerGroup:
    def __init__(self, *, index: int, num_workers: int, use_gpu: bool, cpus_per_worker: int = 1,
                 placement_timeout: float = 120.0):
        self.index, self.num_workers, self.use_gpu = index, num_workers, use_gpu
        bundle = {"CPU": cpus_per_worker, "GPU": 1} if use_gpu else {"CPU": cpus_per_worker}
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(f"group {index}: the cluster cannot place {num_workers} worker(s) with {bundle} each "
                               f"within {placement_timeout:.0f}s")
        self.workers = [
            RemoteWorker.options(
                num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank=rank, world_size=num_workers, use_gpu=use_gpu, threads=cpus_per_worker)
            for rank in range(num_workers)
        ]

    def setup(self, *, spec: ModelSpec, batches_ref: Any, timeout_seconds: float) -> dict:
        addr, port = ray.get(self.workers[0].rendezvous_address.remote())
        refs = [w.setup.remote(master_addr=addr, master_port=port, spec=spec, batches=batches_ref,
                               timeout_seconds=timeout_seconds) for w in self.workers]
        infos = ray.get(refs)
        return {"num_params": infos[0]["num_params"], "load_seconds": max(i["load_seconds"] for i in infos),
                "peak_rss_mib_per_rank": [i["peak_rss_mib"] for i in infos], "pids": [i["pid"] for i in infos]}

    def call(self, method: str, **kwargs) -> list[ray.ObjectRef]:
        """Start ``method`` on every rank (they run collectives together); element 0 is rank 0's result."""
        return [getattr(w, method).remote(**kwargs) for w in self.workers]

    def run(self, method: str, **kwargs) -> Any:
        """``call`` and wait: rank 0's result, or the first rank's error."""
        return ray.get(self.call(method, **kwargs))[0]

    def shutdown(self, *, graceful: bool = True) -> None:
        """Destroy the process group on every rank (all at once, 10 s at most), then kill the actors.

        ``graceful=False`` kills at once: a rank busy in a long call would only take the shutdown after it."""
        if graceful:
            refs = [w.shutdown.remote() for w in self.workers]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=10)
            except Exception:  # a dead rank: killing it below is all that is left to do
                pass
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


