"""``HessianSpectrumCallback``: the Hessian spectrum of a model during a Hugging Face ``Trainer`` run.

    callback = HessianSpectrumCallback(every_steps=10, eval_batches=2)
    callback.attach(trainer)          # trainer.add_callback(callback), and the Trainer to log through
    trainer.train()

Every ``every_steps`` optimizer steps (at ``on_step_end``, after the optimizer step and ``zero_grad``) it measures
the Hessian on a fixed analysis set: the ``batches`` given, or the first ``eval_batches`` batches of the Trainer's
eval dataloader (drawn once, at the first measurement, with every RNG state restored afterwards). It logs the
``hessian/*`` scalars through ``Trainer.log``, so every ``report_to`` backend (TensorBoard, W&B, MLflow, ...) and
``trainer.state.log_history`` get them at that global step; it appends the same row to a Parquet time series
(default ``<output_dir>/hessian_timeseries.parquet``; ``hessian-spectrum plot FILE`` draws it) and to the
optional ``log_to`` sinks. The measurement leaves training bitwise untouched (``hessian_core.preserved_state``):
the losses and final parameters of a run with the callback are those of the run without it.

Models as the Trainer prepares them through accelerate: plain, DDP and FSDP2 (accelerate's ``fsdp_version: 2``).
FSDP1 and DeepSpeed are refused when training begins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from .monitor import CurvatureMonitor, analysed_module, analysis_batches, rng_preserved, shared_across_ranks
from .sinks import SinkSpec


class HessianSpectrumCallback(TrainerCallback):
    """every_steps: measure at global steps every_steps, 2 every_steps, ... batches: the analysis set (input_ids
    tensors or dicts with input_ids / attention_mask / labels; under FSDP2 this rank's own); else the first
    ``eval_batches`` of the eval dataloader. track: ``spectrum`` (``analyze``: probes x steps HVPs, with the
    block-diagonal error when ``blocks``) or ``lambda_max`` (``track_lambda_max``, warm-started from the
    previous measurement, to residual ``tol`` within ``max_hvps``). eps, seed, loss_fn: as for ``analyze``.
    timeseries: the Parquet file of rows ("auto": <output_dir>/hessian_timeseries.parquet, None: none).
    log_to: further sinks (``hessian_core.integrations.sinks``)."""

    def __init__(self, *, every_steps: int = 100, batches: Sequence[torch.Tensor | Mapping] | None = None,
                 eval_batches: int = 4, track: str = "spectrum", probes: int = 2, steps: int = 20,
                 eps: float | str = "auto", blocks: bool = True, tol: float = 1e-3, max_hvps: int = 100,
                 seed: int = 0, loss_fn: Callable | None = None, timeseries: str | None = "auto",
                 log_to: SinkSpec | Sequence[SinkSpec] | None = None):
        if batches is None and (not isinstance(eval_batches, int) or eval_batches < 1):
            raise ValueError(f"eval_batches must be an integer >= 1 (or give batches=), got {eval_batches!r}")
        self.monitor = CurvatureMonitor(every_steps=every_steps, track=track, probes=probes, steps=steps, eps=eps,
                                        blocks=blocks, tol=tol, max_hvps=max_hvps, seed=seed, loss_fn=loss_fn,
                                        timeseries=None, log_to=log_to)
        self.timeseries = timeseries
        self.given = list(batches) if batches is not None else None
        self.eval_batches = eval_batches
        self.trainer = None
        self._batches: list[dict] | None = None

    def attach(self, trainer) -> HessianSpectrumCallback:
        """Add this callback to ``trainer`` and log through it (``Trainer.log``); returns the callback."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    @property
    def rows(self) -> list[dict]:
        return self.monitor.rows

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("HessianSpectrumCallback logs through the Trainer: add it with "
                               "callback.attach(trainer), not callbacks=[...]")
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            raise ValueError("DeepSpeed is not supported: use plain, DDP or FSDP2 (fsdp_version: 2) training")
        plugin = getattr(self.trainer.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(f"FSDP version {getattr(plugin, 'fsdp_version', 1)} is not supported: use FSDP2 "
                             f"(fsdp_config fsdp_version: 2)")
        analysed_module(model)  # FSDP1 modules refused here too, before the first step
        if self.timeseries == "auto":
            self.monitor.timeseries = os.path.join(args.output_dir, "hessian_timeseries.parquet")
        else:
            self.monitor.timeseries = self.timeseries

    def _analysis_set(self, model) -> list[dict]:
        if self._batches is None:
            device = next(analysed_module(model).parameters()).device
            if self.given is not None:
                batches = analysis_batches(self.given, count=None, device=device)
            else:
                if self.trainer.eval_dataset is None:
                    raise ValueError("HessianSpectrumCallback needs batches= or the Trainer's eval_dataset")
                batches = rng_preserved(lambda: analysis_batches(self.trainer.get_eval_dataloader(),
                                                                 count=self.eval_batches, device=device))
            self._batches = shared_across_ranks(batches, analysed_module(model))
        return self._batches

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.monitor.due(state.global_step):
            return
        scalars = self.monitor.measure(model, self._analysis_set(model), step=state.global_step)
        should_log = control.should_log
        self.trainer.log(dict(scalars))
        # Trainer.log's on_log clears should_log: restored, so the Trainer's own log of this step still happens
        control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.close()
