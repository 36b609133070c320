"""The task protocol: what a task record is to a group (it runs itself on every rank) and to the scheduler (a
label, where it would rather run, whether an error of its own is worth a retry), and what a rank offers it.

A new kind of task is a kw_only dataclass deriving from ``TaskRecord`` whose ``run(ctx)`` does the rank's
part, plus a result handler registered in ``pipeline.run.handlers``; no module of the package changes for it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, ClassVar, Protocol

import torch


class RankContext(Protocol):
    """One rank of a formed group, as a task sees it (``actors.worker.Worker`` is one). Every rank of the group
    runs the task at once: the operator's matvecs and ``agree_max`` are collectives."""

    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # this rank's FSDP2-sharded (or whole) model
    space: Any  # hessian_core.ParamSpace over the model's parameters
    batches: Any  # this rank's slice of every analysis batch (hessian_core.loss.BatchSet)
    compute_dtype: torch.dtype
    progress: Callable[[Any], None] | None  # set for the call by execute: where rank 0 reports steps

    def operator(self, eps: float, scheme: str, restore: str = "device") -> Any:
        """The rank's FD HVP operator (hessian_core.FiniteDifferenceHVP) at eps/scheme, built once, its restore
        copy on the device or in host memory (``hvp.restore``)."""

    def gauss_newton(self, eps: float) -> Any:
        """The rank's Gauss-Newton operator (hessian_core.GaussNewtonOperator) at eps, built once."""

    def curvature(self, kind: str, eps: float, scheme: str, restore: str = "device") -> Any:
        """The operator ``lanczos.operator`` names: ``hessian``, ``gauss_newton`` or ``residual`` (H - G)."""

    def memo_get(self, key: Hashable) -> Any:
        """What an earlier task on this group kept under ``key`` (None: nothing), until the model is dropped."""

    def memo_put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for the group's later tasks (e.g. eigenpairs every probe of a study uses)."""

    def timed(self, fn: Callable, *args) -> tuple[Any, float]:
        """(fn(*args), its wall time, the device synchronized before and after)."""

    def agree_max(self, value: int) -> int:
        """The largest of the ranks' values (one all-reduce)."""


class TaskRecord:
    """The base of every task record (which is a frozen kw_only dataclass, sent to every rank of a group)."""

    retry_on_error: ClassVar[bool] = True  # False: an error of the task itself stops the run at once

    @property
    def label(self) -> str:
        """The task's name in the log, run.json's ``running`` and the scheduler's bookkeeping (unique per run)."""
        raise NotImplementedError

    @property
    def affinity(self) -> Hashable | None:
        """A group that holds state for this key (``kept_affinity``) gets the task first."""
        return None

    def kept_affinity(self, result: Any) -> Hashable | None:
        """The key of the state the group keeps after running this task with this result (e.g. the first HVP
        of the probe a calibration ran along)."""
        return None

    def run(self, ctx: RankContext) -> Any:
        """The rank's part; rank 0's return value is the group's result."""
        raise NotImplementedError
