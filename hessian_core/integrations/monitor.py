"""``CurvatureMonitor``: what the Trainer and Lightning callbacks share. Every ``every_steps`` optimizer steps it
measures the Hessian on a fixed analysis set (``analyze``, or the warm-started ``track_lambda_max``), turns the
result into the ``hessian/*`` scalars, appends the row to a Parquet time series (``hessian-spectrum plot`` draws
it) and writes the scalars to the ``log_to`` sinks. The framework-specific parts (where the batches come from, how
the framework logs) stay in the callbacks.

Supported models: plain, DDP (the wrapped module is analysed on every rank, each with the whole analysis set, so
all ranks agree) and FSDP2 (``fully_shard``: every rank analyses its own batches, the loss is their mean).
FSDP1 (``FullyShardedDataParallel``) and DeepSpeed engines are refused.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..api import analyze, append_row
from ..loss import BATCH_KEYS
from ..tracking import TrackerState, track_lambda_max
from .sinks import SinkSpec, open_sinks

TRACKS = ("spectrum", "lambda_max")
# the scalars logged under hessian/ (spectrum; lambda_max logs the first and the tracker's own)
LOGGED_KEYS = ("lambda_max", "lambda_min", "trace", "outlier_count", "block_diagonal_error", "analysis_loss", "hvps")


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def analysed_module(model: nn.Module) -> nn.Module:
    """The module to analyse: DDP's inner module; FSDP1 and DeepSpeed refused in one line."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("FSDP1 (FullyShardedDataParallel) models are not supported: use FSDP2 (fully_shard; "
                         "accelerate's fsdp_version: 2)")
    if type(model).__name__ == "DeepSpeedEngine":
        raise ValueError("DeepSpeed engines are not supported: use plain, DDP or FSDP2 (fully_shard) models")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def rng_preserved(fn: Callable[[], object]) -> object:
    """fn() with the torch / CUDA / Python / NumPy RNG states restored afterwards (drawing the analysis set from a
    dataloader must not shift the training's random stream)."""
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        return fn()
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def analysis_batches(source: Iterable, *, count: int | None, device: torch.device) -> list[dict]:
    """The first ``count`` batches of ``source`` (all for None), with only the keys the analysis loss reads, on
    ``device``."""
    out = []
    for batch in source:
        if count is not None and len(out) >= count:
            break
        batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
        out.append({k: v.to(device) for k, v in batch.items() if k in BATCH_KEYS})
    if not out:
        raise ValueError("the analysis set is empty: give batches= or a non-empty eval dataset")
    return out


def shared_across_ranks(batches: list[dict], model: nn.Module) -> list[dict]:
    """For a replicated (plain or DDP) model on several ranks: every rank's batches gathered onto every rank, so
    each analyses the same whole set and they agree. An FSDP2 model keeps each rank's own (the loss sums them)."""
    from ..sharding import is_sharded

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or is_sharded(model):
        return batches
    device = batches[0]["input_ids"].device
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [{k: v.cpu() for k, v in b.items()} for b in batches])
    return [{k: v.to(device) for k, v in b.items()} for rank in gathered for b in rank]


class CurvatureMonitor:
    """The measuring, the row and the sinks of a callback (see the module docstring)."""

    def __init__(self, *, every_steps: int, track: str = "spectrum", probes: int = 2, steps: int = 20,
                 eps: float | str = "auto", blocks: bool = True, tol: float = 1e-3, max_hvps: int = 100,
                 seed: int = 0, loss_fn=None, timeseries: str | None = None,
                 log_to: SinkSpec | Sequence[SinkSpec] | None = None):
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"every_steps must be an integer >= 1, got {every_steps!r}")
        if track not in TRACKS:
            raise ValueError(f"track {track!r}: expected one of {TRACKS}")
        self.every_steps, self.track = every_steps, track
        self.options = dict(probes=probes, steps=steps, eps=eps, blocks=blocks, seed=seed, loss_fn=loss_fn)
        self.tracker = dict(tol=tol, max_hvps=max_hvps, eps=eps, seed=seed, loss_fn=loss_fn)
        self.timeseries = timeseries
        self.sinks = open_sinks(log_to)
        self.state: TrackerState | None = None
        self.rows: list[dict] = []  # every row measured, in order (also on ranks other than 0)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every_steps == 0

    def measure(self, model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], *, step: int) -> dict:
        """Measure at the model's current parameters; returns the ``hessian/*`` scalars (every rank), after
        appending the row to the time series and logging the sinks (rank 0)."""
        module = analysed_module(model)
        if self.track == "spectrum":
            result = analyze(module, batches, **self.options)
            row = {"step": step, **result.summary()}
            metrics = {"lambda_max": result.lambda_max, "lambda_min": result.lambda_min, "trace": result.trace,
                       "outlier_count": result.statistics.outlier_count, "analysis_loss": result.loss,
                       "hvps": result.hvp_count}
            if self.options["blocks"]:
                metrics["block_diagonal_error"] = result.whole_block_rel_error
        else:
            result = track_lambda_max(module, batches, self.state, **self.tracker)
            self.state = result.state
            row = {"step": step, **result.summary()}
            metrics = {"lambda_max": result.lambda_max, "lambda_max_residual": result.residual,
                       "analysis_loss": result.loss, "hvps": result.hvps}
        scalars = {f"hessian/{k}": float(v) for k, v in metrics.items()}
        self.rows.append(row)
        if is_main_process():
            if self.timeseries:
                os.makedirs(os.path.dirname(os.path.abspath(self.timeseries)), exist_ok=True)
                append_row(self.timeseries, row)
            if self.sinks:
                self.sinks.log(scalars, step)
        return scalars

    def close(self) -> None:
        self.sinks.close()
