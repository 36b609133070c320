"""One rank of an analysis group: joins the group's process group, loads and shards the model, runs probes.

The class is plain Python; ``actors.group`` wraps it with ``ray.remote``. Every public method is called on
all ranks of a group at once (they run collectives together); rank 0's return value is the group's.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from hessian_core import (FiniteDifferenceHVP, accumulate_gradient, latest_complete_step, load_lanczos_state,
                          save_lanczos_state, ParamSpace, block_diagonal_metrics, calibrate_eps, lanczos,
                          parameter_blocks, probe_vector, shard_model)

from .model_loading import DTYPES, ModelSpec, load_model


# checkpoint.every=auto: the next save comes when the steps since the last one took 1/AUTO_CHECKPOINT_COST times
# as long as writing it did, i.e. checkpoints cost at most this fraction of the compute
AUTO_CHECKPOINT_COST = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, *, rank: int, world_size: int, use_gpu: bool, threads: int = 1):
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        torch.set_num_threads(threads)  # the cores Ray reserved for this rank, no more (no oversubscription)
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = self.op = self.space = None

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, *, master_addr: str, master_port: int, spec: ModelSpec, batches: torch.Tensor,
              timeout_seconds: float) -> dict:
        """Form the process group, build and shard the model, keep this rank's slice of every batch."""
        started = time.perf_counter()
        backend = "nccl" if self.use_gpu else "gloo"
        if self.world_size > 1:
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_seconds))
        model = load_model(spec).to(self.device)
        if self.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shard_model(model, mesh=init_device_mesh(self.device.type, (self.world_size,)))
        per_rank = batches.shape[1] // self.world_size
        self.batches = [b[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.device) for b in batches]
        self.model = model
        self.space = ParamSpace(model)
        return {"num_params": self.space.numel, "load_seconds": time.perf_counter() - started,
                "peak_rss_mib": _peak_rss_mib(), "pid": os.getpid()}

    def _operator(self, eps: float, scheme: str) -> FiniteDifferenceHVP:
        """The rank's one HVP operator (built once: it keeps the parameter backup buffer), set to eps/scheme."""
        if self.op is None:
            self.op = FiniteDifferenceHVP(self.model, self.batches, eps=eps, scheme=scheme, space=self.space)
        self.op.eps, self.op.scheme = float(eps), scheme
        return self.op

    def _probe(self, *, seed: int, probe_id: int, vector_dtype: str):
        return probe_vector(self.space, seed=seed, probe_index=probe_id, dtype=DTYPES[vector_dtype])

    def calibrate(self, *, seed: int, scheme: str, eps: float | None) -> dict:
        op = self._operator(1.0 if eps is None else eps, scheme)
        calls = op.calls
        choice = calibrate_eps(op, self._probe(seed=seed, probe_id=0, vector_dtype="float64"), eps=eps)
        return {**choice.as_dict(), "hvp_count": op.calls - calls}

    def gradient_seconds(self, *, repeats: int, warmup: bool = True) -> float:
        """Median wall time of one full gradient over this group's analysis set."""
        times = []
        for _ in range(repeats + int(warmup)):
            self._sync()
            t = time.perf_counter()
            accumulate_gradient(self.model, self.batches)
            self._sync()
            times.append(time.perf_counter() - t)
            self.model.zero_grad(set_to_none=True)
        return statistics.median(times[int(warmup):])

    def run_probe(self, *, probe_id: int, seed: int, eps: float, scheme: str, steps: int, reorth: str, window: int,
                  vector_dtype: str, checkpoint_dir: str | None = None, checkpoint_every: int | str = 0,
                  checkpoint_meta: dict | None = None, progress: Callable[[dict], None] | None = None) -> dict:
        """One probe's whole Lanczos run, continued from its newest complete checkpoint when there is one
        whose metadata matches; returns alpha, beta, per-step timings of this call and the step resumed at."""
        op = self._operator(eps, scheme)
        hvp_seconds: list[float] = []
        step_seconds: list[float] = []

        def timed_matvec(v):
            self._sync()
            t = time.perf_counter()
            out = op.matvec(v)
            self._sync()
            hvp_seconds.append(time.perf_counter() - t)
            return out

        checkpoint_seconds: list[float] = []
        auto = checkpoint_every == "auto"
        next_save = 1 if auto else checkpoint_every
        last = 0.0  # set when the iteration starts

        def on_step(state):
            nonlocal last, next_save
            now = time.perf_counter()
            step_seconds.append(now - last)
            done = state.steps_done
            if checkpoint_dir and next_save and done < steps and not state.stopped and done >= next_save:
                save_lanczos_state(state, folder=checkpoint_dir, rank=self.rank, group=self.space.group, meta=meta)
                checkpoint_seconds.append(time.perf_counter() - now)
                next_save = done + (self._auto_checkpoint_interval(checkpoint_seconds[-1], step_seconds)
                                    if auto else checkpoint_every)
            if progress is not None and self.rank == 0:
                progress({"probe_id": probe_id, "step": done, "steps": steps, "hvp_seconds": hvp_seconds[-1]})
            last = time.perf_counter()  # step times exclude checkpoint writes (reported apart)

        meta = {**(checkpoint_meta or {}), "probe_id": probe_id, "eps": eps, "world_size": self.world_size}
        state, resumed_at = None, 0
        found = latest_complete_step(checkpoint_dir) if checkpoint_dir else None
        if found is not None and {k: found[1].get(k) for k in meta} == meta:
            resumed_at = found[0]
            state = load_lanczos_state(checkpoint_dir, step=resumed_at, rank=self.rank, device=self.device)
        v0 = None if state is not None else self._probe(seed=seed, probe_id=probe_id, vector_dtype=vector_dtype)
        last = time.perf_counter()  # the first step's time excludes drawing the probe or loading a checkpoint
        try:
            result = lanczos(timed_matvec, v0, space=self.space, steps=steps, reorth=reorth, window=window,
                             vector_dtype=DTYPES[vector_dtype], state=state, on_step=on_step)
        except FloatingPointError as e:
            raise FloatingPointError(f"probe {probe_id}: {e}") from None
        return {"probe_id": probe_id, "alphas": result.alphas.tolist(), "betas": result.betas.tolist(),
                "stopped": result.stopped, "hvp_seconds": hvp_seconds, "step_seconds": step_seconds,
                "checkpoint_seconds": checkpoint_seconds, "resumed_at_step": resumed_at}

    def _auto_checkpoint_interval(self, save_seconds: float, step_seconds: list[float]) -> int:
        """Steps until the next checkpoint so that writing them costs <= AUTO_CHECKPOINT_COST of the compute.

        Every rank must pick the same step (a save ends in a barrier): the ranks agree on the largest
        interval with one all-reduce per save."""
        mean_step = statistics.mean(step_seconds) if step_seconds else save_seconds
        interval = max(1, math.ceil(save_seconds / (AUTO_CHECKPOINT_COST * max(mean_step, 1e-9))))
        if self.world_size > 1:
            agreed = torch.tensor([interval], dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.space.group)
            interval = int(agreed.item())
        return interval

    def run_blocks(self, *, probe_id: int, seed: int, eps: float, scheme: str,
                   progress: Callable[[dict], None] | None = None) -> dict:
        op = self._operator(eps, scheme)
        blocks = parameter_blocks(self.model, self.space)
        v = probe_vector(self.space, seed=seed, probe_index=probe_id, kind="gaussian", dtype=op.out_dtype)

        def on_hvp(done, total):
            if progress is not None and self.rank == 0:
                progress({"probe_id": probe_id, "step": done, "steps": total, "hvp_seconds": None})

        m = block_diagonal_metrics(op.matvec, v, space=self.space, blocks=blocks, on_hvp=on_hvp)
        return {"probe_id": probe_id, "blocks": m.blocks, "rel_error": m.rel_error, "cosine": m.cosine,
                "whole_rel_error": m.whole_rel_error, "hvp_count": 1 + len(blocks)}

    def hvp_errors(self, *, eps_values: list[float], seed: int, scheme: str) -> dict:
        """The FD HVP along probe 0 at every eps, against the exact HVP and the most stable FD (hessian_core.eps)."""
        from hessian_core.eps import hvp_error_study

        op = self._operator(eps_values[0], scheme)
        v = self._probe(seed=seed, probe_id=0, vector_dtype="float64")
        return hvp_error_study(op, v, eps_values=eps_values).as_dict()

    def benchmark(self, *, eps: float, repeats: int, window: int, vector_dtype: str) -> list[dict]:
        """Kernel timings and peak memory on this group (see hessian_core.profiling)."""
        from hessian_core.profiling import measure_kernels

        return measure_kernels(self.model, self.batches, eps=eps, repeats=repeats, window=window,
                               vector_dtype=DTYPES[vector_dtype])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
