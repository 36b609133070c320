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

from hessian_core import (FiniteDifferenceHVP, LanczosState, ParamSpace, accumulate_gradient, block_diagonal_metrics,
                          calibrate, lanczos, lanczos_start, latest_complete_step, load_lanczos_state,
                          parameter_blocks, probe_vector)
from hessian_core.block_spectra import block_spectrum
from hessian_core.checkpoint import CheckpointWriter
from hessian_core.loss import BatchSet, rank_batches

from hessian_core.precision import needs_mixed_precision, single_process_group

from .memory import PhaseMemory
from .model_loading import DTYPES, ModelSpec, import_model_code, load_for_rank, load_model
from .records import (BlockResult, BlockSpectrumResult, BlockSpectrumTask, BlockTask, Calibration, GroupInfo,
                      ProbeResult, ProbeTask, ProgressEvent)


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
        self.model = self.op = self.space = None
        self._kept_matvec = None

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, *, index: int, rendezvous: tuple[str, int] | None, spec: ModelSpec, batches: torch.Tensor | BatchSet,
              timeout_seconds: float) -> GroupInfo:
        """Form the process group (none for one rank), build and shard the model, keep this rank's slice of
        every batch."""
        import ray

        started = time.perf_counter()
        backend = "nccl" if self.use_gpu else "gloo"
        if self.world_size > 1:
            addr, port = rendezvous
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_seconds))
        self.spec = spec
        self.compute_dtype = DTYPES[spec.compute_dtype or spec.dtype]
        if self.world_size == 1 and needs_mixed_precision(DTYPES[spec.dtype], self.compute_dtype):
            single_process_group(backend)  # mixed precision on one rank: FSDP2 on a 1-rank mesh (hessian_core.precision)
        import_model_code(spec)  # the imports are not the load's memory
        with PhaseMemory(self.device) as load_memory:  # sharded, or full then sharded (model_loading.choose_loading)
            model, loading = load_for_rank(spec, device=self.device, world_size=self.world_size)
        self.batches = rank_batches(batches, self.rank, self.world_size, device=self.device)
        self.model = model
        self.space = ParamSpace(model)
        self._kept_matvec = None
        return GroupInfo(index=index, num_workers=self.world_size, num_params=self.space.numel,
                         load_seconds=time.perf_counter() - started, peak_rss_mib_per_rank=[_peak_rss_mib()],
                         pids=[os.getpid()],
                         nodes=[ray.get_runtime_context().get_node_id() if ray.is_initialized() else None],
                         loading_per_rank=[loading], load_memory_per_rank=[load_memory.as_dict()])

    def _operator(self, eps: float, scheme: str, restore: str = "device") -> FiniteDifferenceHVP:
        """The rank's one HVP operator (built once: it keeps the parameter backup buffer, on the device or in host
        memory as ``restore`` says), set to eps/scheme."""
        if self.op is None or self.op.restore != restore:
            self.op = None  # the old backup goes before the new one is allocated
            self.op = FiniteDifferenceHVP(self.model, self.batches, eps=eps, scheme=scheme, space=self.space,
                                          restore=restore)
        elif (self.op.eps, self.op.scheme) != (float(eps), scheme):
            self.op = self.op.with_eps(eps).with_scheme(scheme)  # copies share the backup buffer
        return self.op

    def _start_vector(self, *, seed: int, probe_id: int, vector_dtype: str) -> LanczosState:
        """Probe ``probe_id``'s Lanczos start, exactly as ``lanczos`` would make it."""
        v0 = self._probe(seed=seed, probe_id=probe_id, vector_dtype=vector_dtype)
        return lanczos_start(v0, space=self.space, vector_dtype=DTYPES[vector_dtype])

    def calibrate(self, *, task: ProbeTask, fixed_eps: float | None, assess: bool = True) -> Calibration:
        """Choose (or assess a fixed) eps along ``task``'s start vector, then keep the HVP at that eps there: it
        is the probe's first Lanczos matvec when the probe runs next on this group. ``assess=False`` (a fixed
        eps taken as it is) only times one gradient."""
        if not assess:
            return Calibration(eps=fixed_eps, source="fixed", relative_error=None, grad_norm=None,
                               third_derivative=None, perturbation_rounding=None, reliable=None,
                               message=f"eps={fixed_eps:.3g} (fixed, not assessed: hvp.assess is false)",
                               grad_seconds=self.gradient_seconds(repeats=1, warmup=False))
        op = self._operator(1.0 if fixed_eps is None else fixed_eps, task.scheme, task.placement.restore)
        start = self._start_vector(seed=task.seed, probe_id=task.probe_id, vector_dtype=task.vector_dtype)
        q0 = start.vector(start.rows[0])
        calls = op.calls
        calibrated = calibrate(op, q0, eps=fixed_eps, compute_dtype=self.compute_dtype)
        choice, hv, seconds = calibrated.choice, calibrated.hvp, calibrated.hvp_seconds
        op = self._operator(choice.eps, task.scheme, task.placement.restore)
        if hv is None:  # the chosen eps is none of the ladder's steps: one more HVP, kept all the same
            hv, seconds = self._timed(op.matvec, q0)
        self._kept_matvec = (task.probe_id, task.seed, task.vector_dtype, choice.eps, task.scheme, hv, seconds)
        return Calibration(**choice.as_dict(), hvp_count=op.calls - calls, first_matvec_kept=True)

    def gradient_seconds(self, *, repeats: int, warmup: bool = True) -> float:
        """Median wall time of one full gradient over this group's analysis set."""
        times = []
        for _ in range(repeats + int(warmup)):
            times.append(self._timed(accumulate_gradient, self.model, self.batches)[1])
            self.model.zero_grad(set_to_none=True)
        return statistics.median(times[int(warmup):])

    def _take_kept_matvec(self, task: ProbeTask):
        """The calibration's HVP along this probe's start at this eps, once; None if it was for something else."""
        kept, self._kept_matvec = self._kept_matvec, None
        if kept is not None and kept[:5] == (task.probe_id, task.seed, task.vector_dtype, task.eps, task.scheme):
            return kept[5], kept[6]
        return None

    def run_probe(self, *, task: ProbeTask, progress: Callable[[ProgressEvent], None] | None = None) -> ProbeResult:
        """One probe's whole Lanczos run, continued from its newest complete checkpoint when there is one whose
        metadata matches (written by a group of any size); returns alpha, beta and this call's timings."""
        op = self._operator(task.eps, task.scheme, task.placement.restore)
        hvp_seconds: list[float] = []
        step_seconds: list[float] = []
        meta = {**task.checkpoint_meta, "probe_id": task.probe_id, "eps": task.eps}
        state, resumed_at = self._resume(task, meta)
        kept = self._take_kept_matvec(task) if state is None else None

        def timed_matvec(v):
            nonlocal kept
            if kept is not None:  # bitwise what op.matvec(v) gives: the same vector, eps and parameters
                (out, seconds), kept = kept, None
                hvp_seconds.append(seconds)
                return out
            out, seconds = self._timed(op.matvec, v)
            hvp_seconds.append(seconds)
            return out

        reused = kept is not None
        writer = (CheckpointWriter(task.checkpoint_dir, space=self.space, rank=self.rank, world_size=self.world_size,
                                   meta=meta) if task.checkpoint_dir and task.checkpoint_every else None)
        schedule = CheckpointSchedule(task.checkpoint_every, agree=self._agree_max)
        checkpoint_seconds: list[float] = []
        last = 0.0

        def on_step(state):
            nonlocal last
            now = time.perf_counter()
            step_seconds.append(now - last)
            done = state.steps_done
            if writer is not None and done < task.steps and not state.stopped and schedule.due(done):
                checkpoint_seconds.append(writer.save(state))
                schedule.saved(done, checkpoint_seconds[-1], step_seconds)
            if progress is not None and self.rank == 0:
                progress(ProgressEvent(probe_id=task.probe_id, step=done, steps=task.steps,
                                       hvp_seconds=hvp_seconds[-1]))
            last = time.perf_counter()  # step times exclude checkpoint staging (reported apart)

        v0 = None if state is not None else self._probe(seed=task.seed, probe_id=task.probe_id,
                                                        vector_dtype=task.vector_dtype)
        last = time.perf_counter()  # the first step's time excludes drawing the probe or loading a checkpoint
        try:
            result = lanczos(timed_matvec, v0, space=self.space, steps=task.steps, reorth=task.reorth,
                             window=task.window, vector_dtype=DTYPES[task.vector_dtype], state=state, on_step=on_step,
                             vectors=task.placement.vectors)
        except FloatingPointError as e:
            raise FloatingPointError(f"probe {task.probe_id}: {e}") from None
        finally:
            if writer is not None:
                writer.close()
        return ProbeResult(probe_id=task.probe_id, alphas=result.alphas.tolist(), betas=result.betas.tolist(),
                           stopped=result.stopped, hvp_seconds=hvp_seconds, step_seconds=step_seconds,
                           checkpoint_seconds=checkpoint_seconds, resumed_at_step=resumed_at,
                           reused_first_matvec=reused)

    def _probe(self, *, seed: int, probe_id: int, vector_dtype: str):
        return probe_vector(self.space, seed=seed, probe_index=probe_id, dtype=DTYPES[vector_dtype])

    def _resume(self, task: ProbeTask, meta: dict) -> tuple[LanczosState | None, int]:
        """The newest complete checkpoint of this probe with matching metadata (any writer world size)."""
        found = latest_complete_step(task.checkpoint_dir) if task.checkpoint_dir else None
        if found is None or {k: found[1].get(k) for k in meta} != meta:
            return None, 0
        state = load_lanczos_state(task.checkpoint_dir, step=found[0], space=self.space, device=self.device,
                                   vectors=task.placement.vectors)
        return state, found[0]

    def _agree_max(self, value: int) -> int:
        """The largest of the ranks' values (one all-reduce): ranks must checkpoint at the same steps."""
        if self.world_size == 1:
            return value
        agreed = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.space.group)
        return int(agreed.item())

    def run_blocks(self, *, task: BlockTask) -> BlockResult:
        op = self._operator(task.eps, task.scheme, task.placement.restore)
        blocks = parameter_blocks(self.model, self.space)
        v = probe_vector(self.space, seed=task.seed, probe_index=task.probe_id, kind="gaussian", dtype=op.out_dtype)
        m = block_diagonal_metrics(op.matvec, v, space=self.space, blocks=blocks)
        return BlockResult(probe_id=task.probe_id, blocks=m.blocks, rel_error=m.rel_error, cosine=m.cosine,
                           whole_rel_error=m.whole_rel_error, hvp_count=1 + len(blocks))

    def run_block_spectrum(self, *, task: BlockSpectrumTask) -> BlockSpectrumResult:
        """One SLQ probe of the diagonal block ``task.block`` (hessian_core.block_spectra)."""
        blocks = parameter_blocks(self.model, self.space)
        if task.block not in blocks:
            raise ValueError(f"block {task.block!r} is not a block of this model; blocks: {', '.join(blocks)}")
        op = self._operator(task.eps, task.scheme, task.placement.restore)
        calls = op.calls
        idx = blocks[task.block]
        run = block_spectrum(op.matvec, space=self.space, indices=idx, probe_id=task.probe_id, seed=task.seed,
                             steps=task.steps, reorth=task.reorth, window=task.window,
                             vector_dtype=DTYPES[task.vector_dtype], vectors=task.placement.vectors)
        return BlockSpectrumResult(block=task.block, probe_id=task.probe_id,
                                   block_size=sum(self.space.shards[i].global_shape.numel() for i in idx),
                                   alphas=run.alphas.tolist(), betas=run.betas.tolist(), stopped=run.stopped,
                                   hvp_count=op.calls - calls)

    def hvp_errors(self, *, eps_values: list[float], seed: int, scheme: str) -> dict:
        """The FD HVP along probe 0 at every eps, against the exact HVP and the most stable FD (hessian_core.eps)."""
        from hessian_core.eps import hvp_error_study

        op = self._operator(eps_values[0], scheme)
        v = probe_vector(self.space, seed=seed, probe_index=0, dtype=torch.float64)
        reference = self._float64_copy() if self.world_size == 1 else None
        return hvp_error_study(op, v, eps_values=eps_values, compute_dtype=self.compute_dtype,
                               reference_model=reference).as_dict()

    def _float64_copy(self) -> torch.nn.Module:
        """An unsharded float64 model holding this rank's (whole) parameters: the exact reference of hvp-error,
        so every precision is measured against the same float64 double-backward HVP."""
        from dataclasses import replace

        copy = load_model(replace(self.spec, dtype="float64", compute_dtype=None,
                                  activation_checkpointing=False)).to(self.device)
        with torch.no_grad():
            for target, source in zip(ParamSpace(copy).params, self.space.local_params()):
                target.copy_(source.to(torch.float64))
        return copy

    def benchmark(self, *, eps: float, repeats: int, window: int, vector_dtype: str) -> list[dict]:
        """Kernel timings and peak memory on this group (see hessian_core.profiling)."""
        from hessian_core.profiling import measure_kernels

        return measure_kernels(self.model, self.batches, eps=eps, repeats=repeats, window=window,
                               vector_dtype=DTYPES[vector_dtype])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable, *args):
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
