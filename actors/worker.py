"""One rank of an analysis group: joins the group's process group, loads and shards the model, and runs tasks
(``execute(task)``: the task runs itself with the rank as its context, actors.tasks.RankContext).

The class is plain Python; ``actors.group`` wraps it with ``ray.remote``. Every public method is called on
all ranks of a group at once (they run collectives together); rank 0's return value is the group's.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist

from hessian_core import FiniteDifferenceHVP, LanczosState, ParamSpace, lanczos_start, probe_vector
from hessian_core.loss import BatchSet, rank_batches
from hessian_core.models import DTYPES, ModelSpec, import_model_code, load_for_rank, load_model
from hessian_core.precision import needs_mixed_precision, single_process_group

from .memory import PhaseMemory
from .results import GroupInfo, ProgressEvent
from .tasks import TaskRecord


# checkpoint.every=auto: the next save comes when the steps since the last one took 1/AUTO_CHECKPOINT_COST times
# as long as writing it did, i.e. checkpoints cost at most this fraction of the compute
AUTO_CHECKPOINT_COST = 0.05


class CheckpointSchedule:
    """When a probe saves: every ``every`` steps, or (``auto``) after step 1 and then as often as keeps the time
    the compute is held by saves under AUTO_CHECKPOINT_COST of it. Every rank must pick the same steps (a step is
    complete only when all ranks saved it): ``agree`` takes the ranks' largest interval (one all-reduce a save)."""

    def __init__(self, every: int | str, *, agree: Callable[[int], int] = lambda n: n):
        self.auto = every == "auto"
        self.every = 0 if self.auto else int(every)
        self.next = 1 if self.auto else self.every
        self.agree = agree

    def due(self, step: int) -> bool:
        return bool(self.next) and step >= self.next

    def saved(self, step: int, held_seconds: float, step_seconds: list[float]) -> None:
        self.next = step + (self.interval(held_seconds, step_seconds) if self.auto else self.every)

    def interval(self, held_seconds: float, step_seconds: list[float]) -> int:
        mean_step = statistics.mean(step_seconds) if step_seconds else held_seconds
        interval = max(1, math.ceil(held_seconds / (AUTO_CHECKPOINT_COST * max(mean_step, 1e-9))))
        return self.agree(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, *, rank: int, world_size: int, use_gpu: bool, threads: int = 1):
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        torch.set_num_threads(threads)  # the cores Ray reserved for this rank, no more (no oversubscription)
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = self.op = self.gn = self.space = self.batches = None
        self._kept_matvec = None
        self._memo: dict = {}
        self.progress = None  # set by execute for the task's duration

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, *, index: int, rendezvous: tuple[str, int] | None, spec: ModelSpec, batches: torch.Tensor | BatchSet,
              timeout_seconds: float) -> GroupInfo:
        """Form the process group (none for one rank), build and shard the model, keep this rank's slice of
        every batch. Called again on a kept group (a sweep's next point), it drops the previous model and loads
        ``spec`` in the same process group: the ranks' processes, imports and rendezvous are reused."""
        import ray

        started = time.perf_counter()
        self._drop_model()
        backend = "nccl" if self.use_gpu else "gloo"
        if self.world_size > 1 and not dist.is_initialized():
            addr, port = rendezvous
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_seconds))
        self.spec = spec
        self.compute_dtype = DTYPES[spec.compute_dtype or spec.dtype]
        if self.world_size == 1 and needs_mixed_precision(DTYPES[spec.dtype], self.compute_dtype):
            single_process_group(backend)  # mixed precision on one rank: FSDP2 on a 1-rank mesh (hessian_core.precision)
        import_model_code(spec)  # the imports are not the load's memory
        with PhaseMemory(self.device) as load_memory:  # sharded, or full then sharded (models.choose_loading)
            model, loading = load_for_rank(spec, device=self.device, world_size=self.world_size)
        self.batches = rank_batches(batches, self.rank, self.world_size, device=self.device)
        self.model = model
        self.space = ParamSpace(model)
        self._kept_matvec = None
        self._memo = {}
        return GroupInfo(index=index, num_workers=self.world_size, num_params=self.space.numel,
                         load_seconds=time.perf_counter() - started, peak_rss_mib_per_rank=[_peak_rss_mib()],
                         pids=[os.getpid()],
                         nodes=[ray.get_runtime_context().get_node_id() if ray.is_initialized() else None],
                         loading_per_rank=[loading], load_memory_per_rank=[load_memory.as_dict()])

    def _drop_model(self) -> None:
        """Release the previous setup's model, operator (its parameter backup) and batches before a new load."""
        if self.model is None:
            return
        self.model = self.op = self.gn = self.space = self.batches = None
        self._kept_matvec = None
        self._memo = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, task: TaskRecord, progress: Callable[[ProgressEvent], None] | None = None):
        """Run ``task`` on this rank (``task.run(self)``: every rank of the group runs it at once); ``progress``
        is where rank 0 reports steps, for the call's duration."""
        self.progress = progress
        try:
            return task.run(self)
        finally:
            self.progress = None

    def operator(self, eps: float, scheme: str, restore: str = "device") -> FiniteDifferenceHVP:
        """The rank's one HVP operator (built once: it keeps the parameter backup buffer, on the device or in host
        memory as ``restore`` says), set to eps/scheme."""
        if self.op is None or self.op.restore != restore:
            self.op = None  # the old backup goes before the new one is allocated
            self.op = FiniteDifferenceHVP(self.model, self.batches, eps=eps, scheme=scheme, space=self.space,
                                          restore=restore)
        elif (self.op.eps, self.op.scheme) != (float(eps), scheme):
            self.op = self.op.with_eps(eps).with_scheme(scheme)  # copies share the backup buffer
        return self.op

    def gauss_newton(self, eps: float):
        """The rank's Gauss-Newton operator (hessian_core.GaussNewtonOperator) at eps, built once."""
        from hessian_core.gauss_newton import GaussNewtonOperator

        if self.gn is None:
            self.gn = GaussNewtonOperator(self.model, self.batches, eps=eps, space=self.space)
        elif self.gn.eps != float(eps):
            self.gn = self.gn.with_eps(eps)
        return self.gn

    def curvature(self, kind: str, eps: float, scheme: str, restore: str = "device"):
        """The matrix a probe runs on (``lanczos.operator``): ``hessian`` (the FD HVP operator), ``gauss_newton``,
        or ``residual`` (H - G, one of each product a matvec)."""
        from hessian_core.gauss_newton import difference_operator

        if kind == "hessian":
            return self.operator(eps, scheme, restore)
        if kind == "gauss_newton":
            return self.gauss_newton(eps)
        if kind == "residual":
            return difference_operator(self.operator(eps, scheme, restore), self.gauss_newton(eps))
        raise ValueError(f"operator {kind!r}: expected hessian, gauss_newton or residual")

    def memo_get(self, key: Hashable):
        """What a task of this group kept under ``key`` for later tasks on the same model (None: nothing)."""
        return self._memo.get(key)

    def memo_put(self, key: Hashable, value) -> None:
        """Keep ``value`` for this group's later tasks until the model is dropped (a new setup)."""
        self._memo[key] = value

    def start_vector(self, *, seed: int, probe_id: int, vector_dtype: str) -> LanczosState:
        """Probe ``probe_id``'s Lanczos start, exactly as ``lanczos`` would make it."""
        v0 = self.probe(seed=seed, probe_id=probe_id, vector_dtype=vector_dtype)
        return lanczos_start(v0, space=self.space, vector_dtype=DTYPES[vector_dtype])

    def probe(self, *, seed: int, probe_id: int, vector_dtype: str):
        """Probe ``probe_id``'s SLQ start vector (Rademacher), in the rank's shards."""
        return probe_vector(self.space, seed=seed, probe_index=probe_id, dtype=DTYPES[vector_dtype])

    def keep_matvec(self, key: tuple, hv, seconds: float) -> None:
        """Keep an HVP (and its time) for the next task that asks for it with the same ``key``."""
        self._kept_matvec = (key, hv, seconds)

    def take_kept_matvec(self, key: tuple):
        """The kept (HVP, seconds) if it was kept under ``key``, once; None if it was for something else."""
        kept, self._kept_matvec = self._kept_matvec, None
        if kept is not None and kept[0] == key:
            return kept[1], kept[2]
        return None

    def agree_max(self, value: int) -> int:
        """The largest of the ranks' values (one all-reduce): ranks must checkpoint at the same steps."""
        if self.world_size == 1:
            return value
        agreed = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.space.group)
        return int(agreed.item())

    def float64_copy(self) -> torch.nn.Module:
        """An unsharded float64 model holding this rank's (whole) parameters: the exact reference of hvp-error,
        so every precision is measured against the same float64 double-backward HVP."""
        from dataclasses import replace

        copy = load_model(replace(self.spec, dtype="float64", compute_dtype=None,
                                  activation_checkpointing=False)).to(self.device)
        with torch.no_grad():
            for target, source in zip(ParamSpace(copy).params, self.space.local_params()):
                target.copy_(source.to(torch.float64))
        return copy

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable, *args):
        """(fn(*args), its wall time), the device synchronized before and after."""
        self._sync()
        started = time.perf_counter()
        out = fn(*args)
        self._sync()
        return out, time.perf_counter() - started

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
