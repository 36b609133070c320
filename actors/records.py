"""Typed records that cross Ray between the driver and a group: tasks going out, results and progress coming back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def as_dict(record) -> dict:
    """A record as plain JSON-able data (run.json keeps records in this form)."""
    return dataclasses.asdict(record)


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a rank keeps its Lanczos vectors and the FD HVP's restore copy: ``device`` or ``host`` each (the
    driver resolves the config's ``auto``; pipeline.plan.placed_plan). Neither changes a bit of the results."""

    vectors: str = "device"
    restore: str = "device"


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
class ProbeTask:
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

    @property
    def label(self) -> str:
        return f"probe {self.probe_id}"


@dataclass(frozen=True, kw_only=True)
class BlockTask:
    """One block-diagonal analysis probe (a Gaussian vector, one HVP per block and one whole)."""

    probe_id: int
    seed: int
    eps: float
    scheme: str
    placement: Placement = field(default_factory=Placement)

    @property
    def label(self) -> str:
        return f"block probe {self.probe_id}"


@dataclass(frozen=True, kw_only=True)
class BlockSpectrumTask:
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
