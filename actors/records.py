"""Typed records that cross Ray between the driver and a group: tasks going out, results and progress coming back.

A task record runs itself on a rank: ``task.run(ctx)``, ``ctx`` being the rank (``actors.tasks.RankContext``:
its model, operator, batches...), so one ``Worker.execute(task)`` serves every kind. The rank-side code of the
package's own tasks is in ``actors.rank_work``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .tasks import TaskRecord


def as_dict(record) -> dict:
    """A record as plain JSON-able data (run.json keeps records in this form)."""
    return dataclasses.asdict(record)


@dataclass(frozen=True, kw_only=True)
class GroupInfo:
    """A group that has formed: its ranks hold the model and are ready for work."""

    index: int
    num_workers: int
    num_params: int
    load_seconds: float
    peak_rss_mib_per_rank: list[float]
    pids: list[int]
    nodes: list[str]  # Ray node id of each rank
    loading_per_rank: list[str] = field(default_factory=list)  # sharded | full (model_loading.choose_loading)
    load_memory_per_rank: list[dict] = field(default_factory=list)  # actors.memory.PhaseMemory.as_dict()


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The eps chosen (or assessed) along probe 0's start vector, as ``hessian_core.EpsChoice`` plus costs."""

    eps: float
    source: str  # fixed | auto | default
    relative_error: float | None
    grad_norm: float | None
    third_derivative: float | None
    perturbation_rounding: float | None
    reliable: bool | None
    message: str
    hvp_count: int = 0  # HVPs that were extra to the probes (the HVP at eps itself is probe 0's first step)
    grad_seconds: float | None = None  # the calibration's one gradient, timed
    first_matvec_kept: bool = False  # the group keeps the HVP at eps along probe 0's start for its first step
    compute_dtype: str = ""  # forward/backward dtype (model.compute_dtype, or model.dtype)
    roundoff: float | None = None  # c of the round-off term c / eps (see hessian_core.eps)
    roundoff_source: str = ""  # eps_mach*|grad| | measured (mixed precision)


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
class BlockTask(TaskRecord):
    """One block-diagonal analysis probe (a Gaussian vector, one HVP per block and one whole)."""

    probe_id: int
    seed: int
    eps: float
    scheme: str

    @property
    def label(self) -> str:
        return f"block probe {self.probe_id}"

    def run(self, ctx) -> BlockResult:
        from .rank_work import run_blocks

        return run_blocks(ctx, self)


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
class KernelTiming:
    """One kernel of ``bench`` (hessian_core.profiling.measure_kernels' row): its time and peak memory."""

    kernel: str
    seconds: float
    seconds_min: float
    peak_mib: float
    repeats: int
    note: str | None = None
    ratio_to_gradient: float
    peak_over_gradient_mib: float
    device: str
    dtype: str
    num_params: int
    local_params: int
    pid: int

    def as_row(self) -> dict:
        """The row as bench.json has it (``note`` only where there is one)."""
        return {k: v for k, v in as_dict(self).items() if k != "note" or v is not None}


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


@dataclass(frozen=True, kw_only=True)
class BlockSpectrumResult:
    block: str
    probe_id: int
    block_size: int
    alphas: list[float]
    betas: list[float]
    stopped: str
    hvp_count: int


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    probe_id: int
    alphas: list[float]
    betas: list[float]
    stopped: str
    hvp_seconds: list[float]  # this call's HVPs (a resumed probe's earlier steps are not in it)
    step_seconds: list[float]
    checkpoint_seconds: list[float]  # time the compute waited for each checkpoint (staging + the previous write)
    resumed_at_step: int
    reused_first_matvec: bool = False


@dataclass(frozen=True, kw_only=True)
class BlockResult:
    probe_id: int
    blocks: list[str]
    rel_error: list[float]
    cosine: list[float]
    whole_rel_error: float
    hvp_count: int


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    probe_id: int
    step: int
    steps: int
    hvp_seconds: float | None
