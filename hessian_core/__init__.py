"""hessian_core: exact-Hessian HVPs as finite differences of gradient passes on plain or FSDP2-sharded models,
Lanczos / stochastic Lanczos quadrature, spectra, top-k eigenpairs (thick-restart Lanczos) and what is measured
with them, block-diagonal analysis, and a warm-started lambda_max tracker (``track_lambda_max``). Pure PyTorch; never imports Ray.
Models are built and loaded for analysis by the sub-package ``hessian_core.models`` (imported on its own);
the Trainer / Lightning callbacks and log sinks are in ``hessian_core.integrations`` (imported on its own)."""

from .api import SpectrumResult, analyze, append_row, preserved_state
from .approximations import (APPROXIMATIONS, approximation_metrics, block_residual_operator, lowrank_ranks,
                             parse_approximation)
from .block_spectra import BlockOperator, block_space, block_spectrum
from .blocks import BlockMetrics, block_diagonal_metrics, parameter_blocks
from .checkpoint import latest_complete_step, load_lanczos_state, save_lanczos_state
from .eigen import (EigenResult, EigenState, eigen_cycle, eigen_restart, eigen_result, eigen_start, eigen_step,
                    thick_restart_lanczos)
from .eigen_api import eigenpairs, with_fd_bars
from .eigen_checkpoint import (latest_eigen_state, load_eigen_state, load_eigenvectors, save_eigen_state,
                               save_eigenvectors, saved_subspace_overlap)
from .eigen_measures import (EigenMass, GradientFraction, SubspaceOverlap, eigen_mass, gradient_fraction, landscape_1d,
                             landscape_2d, subspace_overlap)
from .eps import (DEFAULT_EPS, Calibrated, EpsChoice, HVPErrorStudy, calibrate, calibrate_eps, default_eps,
                  error_model, hvp_error_study, optimal_eps, predicted_error)
from .gauss_newton import EmpiricalFisherOperator, GaussNewtonOperator, counted_positions, gauss_newton_extra_bytes
from .hvp import ExactHVPUnavailable, FiniteDifferenceHVP, exact_hvp
from .lanczos import LanczosResult, LanczosState, lanczos, lanczos_start, lanczos_step
from .loss import (IGNORE_INDEX, AnalysisLoss, BatchSet, accumulate_gradient, as_batch, causal_lm_loss, counted_tokens,
                   evaluate_loss, token_loss_sum)
from .numerics import float64_numerics, float64_rmsnorm
from .quadrature import (Density, Extremes, RitzRule, SpectralMeasure, TraceEstimate, extreme_eigenvalues,
                         ritz_rule, smoothed_density, trace_estimate, wasserstein1)
from .statistics import SpectrumStatistics, spectral_distance, spectrum_statistics
from .sharding import is_sharded, reshard, shard_model, transformer_blocks
from .tracking import TrackerState, TrackResult, track_lambda_max
from .vectors import ParamSpace, Vector, block_mask, probe_vector

__all__ = [
    "SpectrumResult", "analyze", "append_row", "preserved_state",
    "APPROXIMATIONS", "approximation_metrics", "block_residual_operator", "lowrank_ranks", "parse_approximation",
    "BlockOperator", "block_space", "block_spectrum",
    "BlockMetrics", "block_diagonal_metrics", "parameter_blocks",
    "latest_complete_step", "load_lanczos_state", "save_lanczos_state",
    "EigenResult", "EigenState", "eigen_cycle", "eigen_restart", "eigen_result", "eigen_start", "eigen_step",
    "thick_restart_lanczos", "eigenpairs", "with_fd_bars", "latest_eigen_state", "load_eigen_state", "save_eigen_state",
    "load_eigenvectors", "save_eigenvectors", "saved_subspace_overlap",
    "EigenMass", "GradientFraction", "SubspaceOverlap", "eigen_mass", "gradient_fraction", "landscape_1d",
    "landscape_2d", "subspace_overlap",
    "DEFAULT_EPS", "Calibrated", "EpsChoice", "HVPErrorStudy", "calibrate", "calibrate_eps", "default_eps",
    "error_model", "hvp_error_study", "optimal_eps",
    "predicted_error",
    "EmpiricalFisherOperator", "GaussNewtonOperator", "counted_positions", "gauss_newton_extra_bytes",
    "ExactHVPUnavailable", "FiniteDifferenceHVP", "exact_hvp",
    "LanczosResult", "LanczosState", "lanczos", "lanczos_start", "lanczos_step",
    "IGNORE_INDEX", "AnalysisLoss", "BatchSet", "accumulate_gradient", "as_batch", "causal_lm_loss", "counted_tokens",
    "evaluate_loss", "token_loss_sum", "float64_numerics", "float64_rmsnorm",
    "Density", "Extremes", "RitzRule", "SpectralMeasure", "TraceEstimate", "extreme_eigenvalues", "ritz_rule",
    "smoothed_density", "trace_estimate", "wasserstein1",
    "SpectrumStatistics", "spectral_distance", "spectrum_statistics",
    "is_sharded", "reshard", "shard_model", "transformer_blocks",
    "TrackerState", "TrackResult", "track_lambda_max",
    "ParamSpace", "Vector", "block_mask", "probe_vector",
]
