"""``HessianSpectrumLightningCallback``: the Hessian spectrum of a model during a PyTorch Lightning run, as
``HessianSpectrumCallback`` does for the Hugging Face Trainer.

    trainer = lightning.Trainer(max_steps=40, callbacks=[HessianSpectrumLightningCallback(every_steps=10,
                                                                                          batches=held_out)])

Every ``every_steps`` optimizer steps (``on_train_batch_end`` once ``trainer.global_step`` reaches a multiple) it
measures the Hessian of the analysed module (``module(pl_module)``, default ``pl_module.model`` when the
LightningModule holds a Hugging Face-style causal LM there, else the LightningModule itself) on the ``batches``
given, or the first ``val_batches`` batches of the datamodule's / trainer's validation dataloader. The ``hessian/*``
scalars go to every logger of the trainer (``logger.log_metrics(..., step=global_step)``), the row to the Parquet
time series (default ``<trainer.default_root_dir>/hessian_timeseries.parquet``) and to the ``log_to`` sinks. Training
is left bitwise untouched. Plain, DDP and FSDP2 modules; FSDP1 refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from .monitor import CurvatureMonitor, analysed_module, analysis_batches, rng_preserved, shared_across_ranks
from .sinks import SinkSpec


def default_module(pl_module) -> torch.nn.Module:
    return getattr(pl_module, "model", None) if isinstance(getattr(pl_module, "model", None), torch.nn.Module) \
        else pl_module


class HessianSpectrumLightningCallback(Callback):
    """Arguments as ``HessianSpectrumCallback``'s; ``val_batches`` in place of ``eval_batches``, and ``module``:
    ``pl_module -> the causal LM to analyse``."""

    def __init__(self, *, every_steps: int = 100, batches: Sequence[torch.Tensor | Mapping] | None = None,
                 val_batches: int = 4, track: str = "spectrum", probes: int = 2, steps: int = 20,
                 eps: float | str = "auto", blocks: bool = True, tol: float = 1e-3, max_hvps: int = 100,
                 seed: int = 0, loss_fn: Callable | None = None, timeseries: str | None = "auto",
                 log_to: SinkSpec | Sequence[SinkSpec] | None = None,
                 module: Callable[[object], torch.nn.Module] = default_module):
        self.monitor = CurvatureMonitor(every_steps=every_steps, track=track, probes=probes, steps=steps, eps=eps,
                                        blocks=blocks, tol=tol, max_hvps=max_hvps, seed=seed, loss_fn=loss_fn,
                                        timeseries=None, log_to=log_to)
        self.timeseries, self.given, self.val_batches, self.module = timeseries, batches, val_batches, module
        self._batches: list[dict] | None = None
        self._last = 0

    @property
    def rows(self) -> list[dict]:
        return self.monitor.rows

    def on_train_start(self, trainer, pl_module) -> None:
        analysed_module(self.module(pl_module))  # FSDP1 refused before the first step
        self.monitor.timeseries = (os.path.join(trainer.default_root_dir, "hessian_timeseries.parquet")
                                   if self.timeseries == "auto" else self.timeseries)

    def _analysis_set(self, trainer, model) -> list[dict]:
        if self._batches is None:
            device = next(analysed_module(model).parameters()).device
            if self.given is not None:
                batches = analysis_batches(self.given, count=None, device=device)
            else:
                def draw():
                    source = trainer.datamodule if trainer.datamodule is not None else trainer.fit_loop
                    loaders = source.val_dataloader() if hasattr(source, "val_dataloader") else None
                    if loaders is None:
                        raise ValueError("HessianSpectrumLightningCallback needs batches= or a val_dataloader")
                    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
                    return analysis_batches(loader, count=self.val_batches, device=device)

                batches = rng_preserved(draw)
            self._batches = shared_across_ranks(batches, analysed_module(model))
        return self._batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last or not self.monitor.due(step):  # gradient accumulation: once per optimizer step
            return
        self._last = step
        model = self.module(pl_module)
        scalars = self.monitor.measure(model, self._analysis_set(trainer, model), step=step)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.monitor.close()
