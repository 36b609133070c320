"""Summary statistics of an SLQ spectral measure, and the distance between two spectra.

Definitions (mu is the probe-averaged SLQ measure: atoms theta_i with weights w_i summing to 1, P parameters):
- lambda_max / lambda_min: the largest / smallest atom.
- trace: P * sum_i w_i theta_i.
- negative mass: sum of w_i over theta_i < -ZERO_BAND * width (width = lambda_max - lambda_min): the estimated
  fraction of eigenvalues that are negative by more than SLQ's resolution. A Hessian's bulk sits at zero; a
  Gauss node inside it falls on either side of zero by chance and carries much of the mass, so the sign of
  atoms within the band (the density's own smoothing width) is not counted as information.
- bulk: the connected interval around the density's maximum on which the Gaussian-smoothed density
  (quadrature.smoothed_density) stays >= BULK_LEVEL times its maximum; the bulk edges are the smallest
  and largest atoms inside it (the smoothing itself would widen the interval by a few sigma).
- outliers: the atoms outside the bulk. outlier mass = their total weight (the estimated fraction of eigenvalues
  outside the bulk); outlier count = the mean over probes of how many distinct eigenvalues Lanczos resolved
  beyond the bulk edges: the *converged* Ritz values there (residual bound <= CONVERGED * width), where values
  that agree within their residual bounds or within CONVERGED * width count once. Without full
  reorthogonalization a converged eigenvalue comes back as ghost copies (16 of lambda_max at 300 steps with
  ``reorth: window``), which agree with it to round-off; two eigenvalues closer than 0.1% of the width are not
  told apart. Unconverged Ritz values in a sparse tail are quadrature nodes, not eigenvalues, and are not
  counted (they still carry outlier mass).
- distance: the Wasserstein-1 distance between two measures divided by the reference's width
  (lambda_max - lambda_min), so 0.01 means the spectra differ by 1% of the reference's spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .quadrature import SIGMA_FRACTION, RitzRule, SpectralMeasure, smoothed_density, wasserstein1

BULK_LEVEL = 1e-3
CONVERGED = 1e-3
ZERO_BAND = SIGMA_FRACTION  # the density's own smoothing width, as a fraction of the spectral width


@dataclass(frozen=True)
class SpectrumStatistics:
    lambda_max: float
    lambda_min: float
    trace: float
    negative_mass: float
    bulk_lower: float
    bulk_upper: float
    outlier_count: float
    outlier_mass: float

    def as_dict(self) -> dict:
        return asdict(self)


def bulk_interval(measure: SpectralMeasure, *, level: float = BULK_LEVEL, grid_size: int = 4000) -> tuple[float, float]:
    """The extreme atoms inside the connected region around the density's peak where it stays
    >= level * peak."""
    density = smoothed_density(measure, grid_size=grid_size)
    above = density.density >= level * density.density.max()
    peak = int(np.argmax(density.density))
    lo = peak
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = peak
    while hi < len(above) - 1 and above[hi + 1]:
        hi += 1
    inside = measure.values[(measure.values >= density.grid[lo]) & (measure.values <= density.grid[hi])]
    return float(inside.min()), float(inside.max())


def resolved_outliers(rule: RitzRule, lo: float, hi: float, *, tol: float) -> int:
    """How many distinct eigenvalues outside [lo, hi] one probe resolved: its converged Ritz values there, one
    per cluster of values whose neighbours agree within max(tol, the sum of their residual bounds)."""
    keep = ((rule.values < lo) | (rule.values > hi)) & (rule.residuals <= tol)
    values, residuals = rule.values[keep], rule.residuals[keep]  # ascending, as the rule's
    same = np.diff(values) <= np.maximum(tol, residuals[1:] + residuals[:-1])
    return int(values.size - np.sum(same))


def spectrum_statistics(rules: Sequence[RitzRule], *, dimension: int, level: float = BULK_LEVEL) -> SpectrumStatistics:
    measure = SpectralMeasure.from_rules(rules)
    lo, hi = bulk_interval(measure, level=level)
    outside = (measure.values < lo) | (measure.values > hi)
    tol = CONVERGED * measure.width
    count = float(np.mean([resolved_outliers(r, lo, hi, tol=tol) for r in rules]))
    return SpectrumStatistics(
        lambda_max=float(measure.values[-1]), lambda_min=float(measure.values[0]),
        trace=float(dimension * np.dot(measure.weights, measure.values)),
        negative_mass=float(measure.weights[measure.values < -ZERO_BAND * measure.width].sum()),
        bulk_lower=lo, bulk_upper=hi, outlier_count=count, outlier_mass=float(measure.weights[outside].sum()))


def spectral_distance(measure: SpectralMeasure, reference: SpectralMeasure) -> float:
    """W1(measure, reference) / (reference's lambda_max - lambda_min)."""
    width = reference.width
    w1 = wasserstein1((measure.values, measure.weights), (reference.values, reference.weights))
    return w1 / width if width > 0 else float("inf")
