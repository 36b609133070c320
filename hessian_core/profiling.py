"""Timing and peak memory of the core's kernels on one model and analysis set (used by the benchmarks).

Every figure is a median over ``repeats`` runs after one warm-up, measured on every rank together (they run
collectives). Peak memory is the device's ``max_memory_allocated`` on GPU and the process's peak RSS on CPU
(VmHWM, reset through /proc/self/clear_refs before each kernel), in MiB above what was resident before.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .hvp import ExactHVPUnavailable, FiniteDifferenceHVP, exact_hvp
from .lanczos import LanczosState, lanczos_start, lanczos_step
from .loss import accumulate_gradient
from .vectors import ParamSpace, probe_vector


class PeakMemory:
    """Resettable peak memory of this process on ``device``, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss(self, field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def reset(self) -> float:
        """Reset the peak; returns the current usage (the baseline)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        return self._rss("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._rss("VmHWM")


def _measure(name: str, fn: Callable[[], object], *, repeats: int, memory: PeakMemory) -> dict:
    fn()  # warm-up (allocator, kernels, lazily built buffers)
    times, peaks = [], []
    for _ in range(repeats):
        base = memory.reset()
        start = time.perf_counter()
        out = fn()
        if memory.device.type == "cuda":
            torch.cuda.synchronize(memory.device)
        times.append(time.perf_counter() - start)
        peaks.append(memory.peak() - base)
        del out
    return {"kernel": name, "seconds": statistics.median(times), "seconds_min": min(times),
            "peak_mib": statistics.median(peaks), "repeats": repeats}


def _checkpoint_rows(model, batches, *, space: ParamSpace, v, eps: float, window: int, vector_dtype: torch.dtype,
                     repeats: int, memory: PeakMemory) -> list[dict]:
    """A whole Lanczos step (real HVP, window reorthogonalization), alone and followed by a checkpoint save
    (``checkpoint.every: 1``): the save's cost is what it holds the compute, the write itself runs behind."""
    import shutil
    import tempfile

    import torch.distributed as dist

    from .checkpoint import CheckpointWriter

    op = FiniteDifferenceHVP(model, batches, eps=eps, space=space)
    state = lanczos_start(v, space=space, vector_dtype=vector_dtype, capacity=window)
    rank, world = (dist.get_rank(space.group), dist.get_world_size(space.group)) if space.group is not None else (0, 1)
    folder = tempfile.mkdtemp(prefix="hs-checkpoint-bench-")
    if world > 1:  # every rank writes into rank 0's folder, as a group does into output_dir
        names = [folder]
        dist.broadcast_object_list(names, src=0, group=space.group)
        folder = names[0]
    writer = CheckpointWriter(folder, space=space, rank=rank, world_size=world, meta={})

    def step():
        lanczos_step(state, op.matvec, space=space, reorth="window", window=window)

    def step_and_save():
        step()
        writer.save(state)

    try:
        rows = [_measure("lanczos_step", step, repeats=repeats, memory=memory),
                _measure("lanczos_step_checkpoint_every1", step_and_save, repeats=repeats, memory=memory)]
        writer.close()
    finally:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    rows[1]["note"] = f"{rows[1]['seconds'] / rows[0]['seconds'] - 1:+.1%} per step against no checkpoint"
    return rows


def measure_kernels(model: torch.nn.Module, batches: Sequence[Tensor], *, eps: float, repeats: int = 5,
                    window: int = 8, vector_dtype: torch.dtype = torch.float32) -> list[dict]:
    """Gradient, FD HVP (central, Richardson), exact HVP where it runs, and Lanczos vector work per step."""
    space = ParamSpace(model)
    memory = PeakMemory(space.device)
    v = probe_vector(space, seed=0, probe_index=0, dtype=vector_dtype)

    def gradient():
        accumulate_gradient(model, batches)
        model.zero_grad(set_to_none=True)

    rows = [_measure("gradient", gradient, repeats=repeats, memory=memory)]
    for scheme in ("central", "richardson"):
        op = FiniteDifferenceHVP(model, batches, eps=eps, scheme=scheme, space=space)
        rows.append(_measure(f"fd_hvp_{scheme}", lambda op=op: op.matvec(v), repeats=repeats, memory=memory))
    try:
        rows.append(_measure("exact_hvp", lambda: exact_hvp(model, batches, v=v), repeats=repeats, memory=memory))
    except ExactHVPUnavailable as e:
        rows.append({"kernel": "exact_hvp", "seconds": float("nan"), "seconds_min": float("nan"),
                     "peak_mib": float("nan"), "repeats": 0, "note": str(e)})
    hv = FiniteDifferenceHVP(model, batches, eps=eps, space=space).matvec(v)
    for reorth in ("none", "window", "full"):
        kept = window if reorth == "window" else 2 * window if reorth == "full" else 2

        # a state already holding `kept` vectors; each timed call is one step whose "HVP" returns a stored
        # real one, so what is timed is the step's own vector arithmetic and all-reduces
        start = lanczos_start(v, space=space, vector_dtype=vector_dtype)
        state = LanczosState.from_basis([start.basis[0]] * kept, shapes=start.shapes,
                                        alphas=[1.0] * (kept - 1), betas=[1.0] * (kept - 1),
                                        capacity=kept + repeats + 4)  # warm-up and timed steps never grow it

        def vector_work(reorth=reorth, state=state):
            lanczos_step(state, lambda q: hv, space=space, reorth=reorth, window=window)

        label = {"none": "lanczos_vectors_none", "window": f"lanczos_vectors_window{window}",
                 "full": f"lanczos_vectors_full{2 * window}"}[reorth]
        rows.append(_measure(label, vector_work, repeats=repeats, memory=memory))
    rows += _checkpoint_rows(model, batches, space=space, v=v, eps=eps, window=window, vector_dtype=vector_dtype,
                             repeats=repeats, memory=memory)
    grad = rows[0]
    for row in rows:
        row["ratio_to_gradient"] = row["seconds"] / grad["seconds"]
        row["peak_over_gradient_mib"] = row["peak_mib"] - grad["peak_mib"]
    row_env = {"device": str(space.device), "dtype": str(space.dtype).removeprefix("torch."),
               "num_params": space.numel, "local_params": space.local_numel, "pid": os.getpid()}
    return [{**row, **row_env} for row in rows]
