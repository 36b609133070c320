"""hessian_core: exact-Hessian HVPs as finite differences of gradient passes on plain or FSDP2-sharded models,
Lanczos / stochastic Lanczos quadrature, spectra and block-diagonal analysis. Pure PyTorch; never imports Ray."""

from .blocks import BlockMetrics, block_diagonal_metrics, parameter_blocks
from .checkpoint import latest_complete_step, load_lanczos_state, save_lanczos_state
from .eps import (DEFAULT_EPS, EpsChoice, HVPErrorStudy, calibrate_eps, default_eps, error_model, hvp_error_study,
                  optimal_eps, predicted_error)
from .hvp import ExactHVPUnavailable, FiniteDifferenceHVP, exact_hvp
from .lanczos import LanczosResult, LanczosState, lanczos, lanczos_start, lanczos_step
from .loss import accumulate_gradient, causal_lm_loss, evaluate_loss
from .numerics import float64_rmsnorm
from .quadrature import (Density, Extremes, RitzRule, SpectralMeasure, TraceEstimate, extreme_eigenvalues,
                         ritz_rule, smoothed_density, trace_estimate, wasserstein1)
from .statistics import SpectrumStatistics, spectral_distance, spectrum_statistics
from .sharding import is_sharded, reshard, shard_model, transformer_blocks
from .vectors import ParamSpace, Vector, block_mask, probe_vector

__all__ = [
    "BlockMetrics", "block_diagonal_metrics", "parameter_blocks",
    "latest_complete_step", "load_lanczos_state", "save_lanczos_state",
    "DEFAULT_EPS", "EpsChoice", "HVPErrorStudy", "calibrate_eps", "default_eps", "error_model", "hvp_error_study",
    "optimal_eps",
    "predicted_error",
    "ExactHVPUnavailable", "FiniteDifferenceHVP", "exact_hvp",
    "LanczosResult", "LanczosState", "lanczos", "lanczos_start", "lanczos_step",
    "accumulate_gradient", "causal_lm_loss", "evaluate_loss", "float64_rmsnorm",
    "Density", "Extremes", "RitzRule", "SpectralMeasure", "TraceEstimate", "extreme_eigenvalues", "ritz_rule",
    "smoothed_density", "trace_estimate", "wasserstein1",
    "SpectrumStatistics", "spectral_distance", "spectrum_statistics",
    "is_sharded", "reshard", "shard_model", "transformer_blocks",
    "ParamSpace", "Vector", "block_mask", "probe_vector",
]
