"""Log sinks: where curvature scalars go besides a framework's own logging. A sink is named by a string or given as
a callable, and ``open_sinks`` turns a list of them into one ``Sinks`` object with ``log(metrics, step)`` and
``close()``:

- ``tensorboard:DIR``: event files in DIR (``torch.utils.tensorboard``; needs the ``tensorboard`` package);
- ``mlflow:URI``: one MLflow run in a tracking store; a plain folder is taken as a local file store
  (``file:///abs/folder``; MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it, which is set unless already
  set); the experiment is ``hessian-spectrum`` (needs ``mlflow-skinny`` or ``mlflow``);
- ``wandb`` or ``wandb:DIR``: one Weights & Biases run in offline mode (files under DIR, default ``.``; sync them
  later with ``wandb sync``), project ``hessian-spectrum`` (needs ``wandb``);
- a callable ``fn(metrics: dict[str, float], step: int)``.

Each backend is imported and opened at the first ``log``, so naming one costs nothing until something is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

SinkSpec = str | Callable[[Mapping[str, float], int], None]
KINDS = ("tensorboard", "mlflow", "wandb")
PROJECT = "hessian-spectrum"


def parse_sink(spec: str) -> tuple[str, str]:
    """(kind, target) of a sink string; one line naming it and the valid forms otherwise."""
    kind, _, target = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or (kind != "wandb" and not target):
        raise ValueError(f"log_to entry {spec!r}: expected 'tensorboard:DIR', 'mlflow:URI_OR_DIR', 'wandb' or "
                         f"'wandb:DIR', or a callable (metrics, step)")
    return kind, target


class _TensorBoard:
    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()  # a crash later still leaves the scalars written so far

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, target: str):
        from mlflow import MlflowClient

        uri = target if "://" in target or target.startswith("file:") else "file://" + os.path.abspath(target)
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told otherwise; naming a folder here is that request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)  # a client of its own: no global mlflow state is touched
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(experiment_id).info.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key=k, value=float(v), timestamp=now, step=int(step))
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    def __init__(self, folder: str):
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=folder, project=PROJECT, reinit="create_new")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class _Callable:
    def __init__(self, fn: Callable[[Mapping[str, float], int], None]):
        self.fn = fn

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.fn(dict(metrics), int(step))

    def close(self) -> None:
        pass


def _open(spec: SinkSpec):
    if callable(spec):
        return _Callable(spec)
    kind, target = parse_sink(spec)
    if kind == "tensorboard":
        return _TensorBoard(target)
    if kind == "mlflow":
        return _MLflow(target)
    return _WandB(target or ".")


class Sinks:
    """The sinks of a ``log_to`` list, opened lazily; ``log`` writes one step's scalars to every one of them."""

    def __init__(self, specs: Sequence[SinkSpec]):
        for spec in specs:
            if not callable(spec):
                if not isinstance(spec, str):
                    raise ValueError(f"log_to entry {spec!r}: expected a string such as 'tensorboard:DIR' or a "
                                     f"callable (metrics, step)")
                parse_sink(spec)  # bad names fail here, before any training or analysis
        self.specs = list(specs)
        self._open: list | None = None

    def __bool__(self) -> bool:
        return bool(self.specs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._open is None:
            self._open = [_open(spec) for spec in self.specs]
        for sink in self._open:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self._open or []:
            sink.close()
        self._open = None


def open_sinks(log_to: SinkSpec | Sequence[SinkSpec] | None) -> Sinks:
    """A ``Sinks`` of one spec, a list of them, or none (``None`` or ``[]``: logging goes nowhere)."""
    if log_to is None:
        return Sinks([])
    if isinstance(log_to, str) or callable(log_to):
        return Sinks([log_to])
    return Sinks(list(log_to))
