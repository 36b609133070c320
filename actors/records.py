"""Typed records that cross Ray between the driver and a group: tasks going out, results and progress coming back.

A task record runs itself on a rank: ``task.run(ctx)``, ``ctx`` being the rank (``actors.tasks.RankContext``:
its model, operator, batches...), so one ``Worker.execute(task)`` serves every kind. The rank-side code of the
package's own tasks is in ``actors.rank_work``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the results live apart so that the rank-side code (actors.rank_work), which the tasks call, needs no task module
from .results import (ApproximationResult, as_dict, BlockResult, BlockSpectrumResult, Calibration, EigenpairsResult,
                      GroupInfo, KernelTiming, ProbeResult, ProgressEvent, TraceResult)  # noqa: F401
from .tasks import TaskRecord


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a rank keeps its Lanczos vectors and the FD HVP's restore copy: ``device`` or ``host`` each (the
    driver resolves the config's ``auto``; pipeline.run.plan.placed_plan). Neither changes a bit of the results."""

    vectors: str = "device"
    restore: str = "device"


@dataclass(frozen=True, kw_only=True)
class ProbeTask(TaskRecord):
    """One SLQ probe: a Lanczos run from probe ``probe_id``'s start vector, resumed from a checkpoint if any."""

    probe_id: int
    seed: int
    eps: float
    scheme: str
    steps: int
    reorth: str
    window: int
    vector_dtype: str
    checkpoint_dir: str | None
    checkpoint_every: int | str
    checkpoint_meta: dict = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)
    operator: str = "hessian"  # lanczos.operator: hessian, gauss_newton or residual (H - G)
    stop_tol: float | None = None  # lanczos.steps: auto: stop at hessian_core.convergence.ProbeStopRule(tol), else
    # run all ``steps``

    @property
    def label(self) -> str:
        return f"probe {self.probe_id}"

    @property
    def affinity(self) -> tuple:
        return ("probe", self.probe_id)

    def run(self, ctx) -> ProbeResult:
        from .rank_work import run_probe

        return run_probe(ctx, self)


@dataclass(frozen=True, kw_only=True)
class EigenTask(TaskRecord):
    """The top-k eigenpairs of the FD HVP at ``eps`` by thick-restart Lanczos, its state saved after every restart
    in ``checkpoint_dir`` (None: never) and resumed from the newest complete one with matching metadata (written
    by a group of any size); then each eigenvalue's FD bar, the eigen mass, the gradient fraction and the
    landscape slices, and the eigenvectors saved to ``vectors_dir`` (None: not saved). ``roundoff``: the
    calibration's c of one HVP's round-off c / eps (None: eps_mach x |grad L| on the ranks). ``landscape_range``:
    the slices' half-width (None: from each eigenvalue and the loss)."""

    k: int
    which: str
    tol: float
    max_hvps: int
    basis: int | None
    seed: int
    eps: float
    scheme: str
    vector_dtype: str
    roundoff: float | None
    checkpoint_dir: str | None
    checkpoint_meta: dict = field(default_factory=dict)
    vectors_dir: str | None
    landscape_points_1d: int
    landscape_points_2d: int
    landscape_range: float | None
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return "eigenpairs"

    def run(self, ctx) -> EigenpairsResult:
        from .rank_work import run_eigen

        return run_eigen(ctx, self)


@dataclass(frozen=True, kw_only=True)
class BlockTask(TaskRecord):
    """One block-diagonal analysis probe (a Gaussian vector, one HVP per block and one whole)."""

    probe_id: int
    seed: int
    eps: float
    scheme: str
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return f"block probe {self.probe_id}"

    def run(self, ctx) -> BlockResult:
        from .rank_work import run_blocks

        return run_blocks(ctx, self)


@dataclass(frozen=True, kw_only=True)
class ApproximationTask(TaskRecord):
    """One probe of the approximation study (``blocks.approximations``): a Gaussian vector v, the exact FD H v,
    and each approximation's A v against it per block. The low-rank approximations' eigenpairs (of H, and of
    H - B for ``block_diagonal_plus_lowrank``) are solved once per group, to ``eigen_tol`` within
    ``eigen_max_hvps`` FD HVPs per solve, and kept by the group for its later probes (``affinity``)."""

    probe_id: int
    seed: int
    eps: float
    scheme: str
    approximations: tuple[str, ...]
    eigen_tol: float
    eigen_max_hvps: int
    eigen_seed: int
    vector_dtype: str
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return f"approximation probe {self.probe_id}"

    @property
    def affinity(self) -> tuple:
        return ("lowrank", self.eps, self.scheme, self.approximations)

    def kept_affinity(self, result) -> tuple:
        return self.affinity

    def run(self, ctx) -> ApproximationResult:
        from .rank_work import run_approximations

        return run_approximations(ctx, self)


@dataclass(frozen=True, kw_only=True)
class TraceTask(TaskRecord):
    """The trace by Hutch++ (``estimator`` "hutchpp": a sketch of ``sketch`` HVPs, the trace on its span) or by
    deflation ("deflated": the ``sketch`` eigenpairs largest in magnitude to ``eigen_tol``, their eigenvalues
    summed), plus Hutchinson samples on the rest until their standard error is <= ``rtol`` x |trace| or the
    whole task has spent ``max_hvps``."""

    estimator: str
    eigen_tol: float
    seed: int
    eps: float
    scheme: str
    sketch: int
    max_hvps: int
    rtol: float
    vector_dtype: str
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return f"trace ({self.estimator})"

    def run(self, ctx) -> TraceResult:
        from .rank_work import run_trace

        return run_trace(ctx, self)


@dataclass(frozen=True, kw_only=True)
class BlockSpectrumTask(TaskRecord):
    """One SLQ probe of a diagonal block H_bb (``blocks.spectra``): Lanczos over the block's parameters."""

    block: str
    probe_id: int
    seed: int
    eps: float
    scheme: str
    steps: int  # capped at the block's size by the worker
    reorth: str
    window: int
    vector_dtype: str
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return f"block {self.block} probe {self.probe_id}"

    def run(self, ctx) -> BlockSpectrumResult:
        from .rank_work import run_block_spectrum

        return run_block_spectrum(ctx, self)


@dataclass(frozen=True, kw_only=True)
class CalibrationTask(TaskRecord):
    """Choose (or assess) eps along ``probe``'s start vector on the first group that forms; the group keeps the
    HVP at that eps as the probe's first Lanczos step."""

    probe: ProbeTask
    fixed_eps: float | None
    assess: bool = True  # false: take fixed_eps as it is and only time one gradient
    retry_on_error = False  # a calibration that fails would fail again: the run stops

    @property
    def label(self) -> str:
        return "eps calibration"

    def kept_affinity(self, result: Calibration) -> tuple | None:
        return self.probe.affinity if result.first_matvec_kept else None

    def run(self, ctx) -> Calibration:
        from .rank_work import calibrate

        return calibrate(ctx, self)


@dataclass(frozen=True, kw_only=True)
class GradientTimingTask(TaskRecord):
    """The median wall time of one full gradient over the group's analysis set (a float)."""

    repeats: int
    warmup: bool = True

    @property
    def label(self) -> str:
        return "gradient timing"

    def run(self, ctx) -> float:
        from .rank_work import gradient_seconds

        return gradient_seconds(ctx, repeats=self.repeats, warmup=self.warmup)


@dataclass(frozen=True, kw_only=True)
class HVPErrorTask(TaskRecord):
    """``hvp-error``: the FD HVP along probe 0 at every eps against the exact and the most stable FD HVP; returns
    ``hessian_core.eps.HVPErrorStudy``."""

    eps_values: list[float]
    seed: int
    scheme: str

    @property
    def label(self) -> str:
        return "hvp-error study"

    def run(self, ctx) -> Any:
        from .rank_work import hvp_errors

        return hvp_errors(ctx, self)


@dataclass(frozen=True, kw_only=True)
class KernelBenchTask(TaskRecord):
    """``bench``'s kernels: gradient, FD and exact HVP, Lanczos vector work; returns a list of KernelTiming."""

    eps: float
    repeats: int
    window: int
    vector_dtype: str

    @property
    def label(self) -> str:
        return "kernel benchmark"

    def run(self, ctx) -> list[KernelTiming]:
        from .rank_work import kernel_timings

        return kernel_timings(ctx, self)
