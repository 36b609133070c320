"""Typed records that come back across Ray from a group's ranks: a formed group, a calibration, each task type's
result, progress events."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    scheme: str = ""  # the HVP scheme whose error rule was applied (hessian_core.EpsChoice.scheme)


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
class ApproximationResult:
    """One probe of the approximation study: a row per (approximation, block), in the task's order, with the
    whole-vector figures of its approximation repeated on each of its rows."""

    probe_id: int
    approximations: list[str]
    blocks: list[str]
    rel_error: list[float]
    cosine: list[float]
    whole_rel_error: list[float]
    whole_cosine: list[float]
    hvp_count: int  # FD HVPs, the low-rank eigenpairs' included where this task computed them
    gauss_newton_products: int
    lowrank_hvps: int  # of hvp_count: the eigenpairs' solves (0 where the group had them from an earlier probe)
    # per low-rank kind solved on this group: k, the eigenvalues, how many converged, the solve's HVPs, why it stopped
    lowrank_solves: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """The Hutch++ task's estimate (hessian_core.trace.TraceEstimate) and its cost."""

    trace: float
    stderr: float
    sketch_trace: float
    sketch: int
    samples: list[float]
    hvps: int
    stopped: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    probe_id: int
    step: int
    steps: int
    hvp_seconds: float | None


@dataclass(frozen=True, kw_only=True)
class EigenpairsResult:
    """An eigen task's pairs and what was measured with them (``actors.rank_work.run_eigen``): best first in the
    order of ``which``. ``hvps``/``restarts`` are the solver's over every invocation (a resumed task counts those
    before its checkpoint), ``hvp_count`` this call's HVPs (the solver's since its checkpoint, plus the 2k of the
    FD bars); ``resumed_at_restart``/``resumed_at_hvps``: where the checkpoint it resumed from stood (0: none).
    ``fd_bounds`` is each eigenvalue's FD bar (hessian_core.error_bars.rayleigh_fd_bound) from the Rayleigh
    quotients ``rayleigh_eps``/``rayleigh_2eps``; ``errors`` residual + fd_bound. Mass rows are per eigenvector,
    over ``mass_tensors`` (each in block ``mass_block_of``) and ``mass_blocks``. The landscape: the loss at
    theta + t u_1 for t in ``landscape_t``, and at theta + s u_1 + t u_2 on ``landscape_2d_s`` x ``landscape_2d_t``
    (rows: s; empty without a second eigenvector or with points_2d 0). ``vectors_saved``: the eigenvectors are in
    the task's ``vectors_dir``."""

    k: int
    which: str
    tol: float
    eps: float
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    fd_bounds: list[float]
    errors: list[float]
    rayleigh_eps: list[float]
    rayleigh_2eps: list[float]
    roundoff: float | None
    norm_estimate: float
    hvps: int
    restarts: int
    stopped: str
    hvp_count: int
    resumed_at_restart: int
    resumed_at_hvps: int
    mass_tensors: list[str]
    mass_blocks: list[str]
    mass_block_of: list[str]
    mass_per_tensor: list[list[float]]
    mass_per_block: list[list[float]]
    gradient_fraction: float
    gradient_per_vector: list[float]
    grad_norm: float
    loss: float
    landscape_t: list[float]
    landscape_loss: list[float]
    landscape_2d_s: list[float]
    landscape_2d_t: list[float]
    landscape_2d_loss: list[list[float]]
    vectors_saved: bool
    seconds: float
    solver_seconds: float = 0.0  # the thick-restart Lanczos alone (this invocation), within ``seconds``
