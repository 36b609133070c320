"""From Lanczos tridiagonals to spectra: Ritz values and weights, the SLQ spectral measure, densities, traces.

Each probe's tridiagonal T (alpha on the diagonal, beta off it) is diagonalized by a symmetric tridiagonal
eigensolver in float64. Its Ritz values theta_i with weights w_i = (first component of the i-th eigenvector)^2
form a quadrature rule for v^T f(H) v; averaging the rules over unit probes gives the SLQ estimate of the
spectral measure (1/P) sum_k delta(lambda - lambda_k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal

# Density smoothing: a Gaussian of standard deviation SIGMA_FRACTION * (largest - smallest Ritz value),
# on a grid reaching GRID_MARGIN sigmas past the extreme Ritz values.
SIGMA_FRACTION = 0.01
GRID_MARGIN = 5.0


@dataclass(frozen=True)
class RitzRule:
    """One probe's quadrature rule: Ritz values (ascending), weights (summing to 1), residual bounds."""

    values: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray  # |beta_m * last eigenvector component|: each Ritz value is within this of an eigenvalue


def ritz_rule(alphas: Sequence[float], betas: Sequence[float]) -> RitzRule:
    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(betas, dtype=np.float64)
    if a.size == 0:
        raise ValueError("empty tridiagonal")
    if b.size != a.size:
        raise ValueError(f"expected as many betas as alphas (the last is the residual), got {b.size} and {a.size}")
    values, vectors = eigh_tridiagonal(a, b[:-1]) if a.size > 1 else (a.copy(), np.ones((1, 1)))
    weights = vectors[0, :] ** 2
    weights = weights / weights.sum()
    residuals = np.abs(b[-1] * vectors[-1, :])
    return RitzRule(values, weights, residuals)


@dataclass(frozen=True)
class SpectralMeasure:
    """The probe-averaged SLQ measure: atoms at Ritz values with weights summing to 1."""

    values: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_rules(cls, rules: Sequence[RitzRule]) -> SpectralMeasure:
        if not rules:
            raise ValueError("no probes")
        values = np.concatenate([r.values for r in rules])
        weights = np.concatenate([r.weights / len(rules) for r in rules])
        order = np.argsort(values, kind="stable")
        return cls(values[order], weights[order])

    @property
    def width(self) -> float:
        return float(self.values[-1] - self.values[0])


@dataclass(frozen=True)
class Density:
    grid: np.ndarray
    density: np.ndarray
    sigma: float


def smoothed_density(measure: SpectralMeasure, *, grid_size: int = 1000, sigma: float | None = None) -> Density:
    """Gaussian-smoothed density on a uniform grid; integrates to 1 there (trapezoid rule) and is never negative.

    sigma defaults to SIGMA_FRACTION of the spectral width (or 1e-3 * max(1, |lambda|) for a single atom).
    """
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    lo, hi = float(measure.values[0]), float(measure.values[-1])
    if sigma is None:
        sigma = SIGMA_FRACTION * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(lo))
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = np.linspace(lo - GRID_MARGIN * sigma, hi + GRID_MARGIN * sigma, grid_size)
    density = np.maximum(gaussian_mixture(grid, measure.values, measure.weights, sigma=sigma), 0.0)
    density /= np.trapezoid(density, grid)
    return Density(grid, density, float(sigma))


def gaussian_mixture(grid: np.ndarray, values: np.ndarray, weights: np.ndarray, *, sigma: float) -> np.ndarray:
    """sum_i weights_i N(grid; values_i, sigma^2): atoms smoothed by a Gaussian of width sigma, not renormalized."""
    z = (grid[:, None] - np.asarray(values)[None, :]) / sigma
    return (np.exp(-0.5 * z * z) * np.asarray(weights)[None, :]).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))


def block_densities(block_rules: Mapping[str, Sequence[RitzRule]], block_sizes: Mapping[str, int], *,
                    grid: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Each block's probe-averaged SLQ density on ``grid`` (Gaussian of width sigma), scaled by its share
    block_size / sum of sizes: the scaled densities add up to the spectrum of the block-diagonal approximation."""
    total = float(sum(block_sizes[name] for name in block_rules))
    out = {}
    for name, rules in block_rules.items():
        values = np.concatenate([r.values for r in rules])
        weights = np.concatenate([r.weights for r in rules]) / len(rules)
        out[name] = gaussian_mixture(grid, values, weights, sigma=sigma) * float(block_sizes[name]) / total
    return out


def rules_from_columns(probe_ids: Sequence[int], values: Sequence[float], weights: Sequence[float],
                       residuals: Sequence[float] | None = None) -> list[RitzRule]:
    """One rule per probe (in probe order, values ascending) from the columns of a Ritz table such as
    ``SpectrumResult.to_arrow()`` or a run's ritz.parquet; residuals default to zero (a block's Ritz table)."""
    ids = np.asarray(probe_ids)
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    residuals = np.zeros_like(values) if residuals is None else np.asarray(residuals, np.float64)
    order = np.lexsort((values, ids))
    ids, values, weights, residuals = ids[order], values[order], weights[order], residuals[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else np.array([], dtype=int)
    bounds = list(starts) + [ids.size]
    return [RitzRule(values[a:b], weights[a:b], residuals[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class TraceEstimate:
    trace: float
    stderr: float
    per_probe: np.ndarray


def trace_estimate(rules: Sequence[RitzRule], *, dimension: int) -> TraceEstimate:
    """Hutchinson through quadrature: P * v^T H v = P * sum_i w_i theta_i per unit probe, averaged."""
    per_probe = np.array([dimension * float(np.dot(r.weights, r.values)) for r in rules])
    stderr = float(per_probe.std(ddof=1) / math.sqrt(len(per_probe))) if len(per_probe) > 1 else float("nan")
    return TraceEstimate(float(per_probe.mean()), stderr, per_probe)


@dataclass(frozen=True)
class Extremes:
    lambda_max: float
    lambda_max_residual: float
    lambda_min: float
    lambda_min_residual: float


def extreme_eigenvalues(rules: Sequence[RitzRule]) -> Extremes:
    """The largest and smallest Ritz values over all probes, with their residual bounds."""
    top = max(((r.values[-1], r.residuals[-1]) for r in rules), key=lambda x: x[0])
    bottom = min(((r.values[0], r.residuals[0]) for r in rules), key=lambda x: x[0])
    return Extremes(float(top[0]), float(top[1]), float(bottom[0]), float(bottom[1]))


@dataclass(frozen=True, kw_only=True)
class SpectrumSummary:
    """The extremes with their residual bounds and the trace with its standard error (nan for one probe)."""

    lambda_max: float
    lambda_max_residual: float
    lambda_min: float
    lambda_min_residual: float
    trace: float
    trace_stderr: float
    probes: int

    def as_record(self) -> dict:
        """As run.json's ``summary`` holds it: a missing standard error is null."""
        record = dict(vars(self))
        record["trace_stderr"] = None if math.isnan(self.trace_stderr) else self.trace_stderr
        return record


def summarize(rules: Sequence[RitzRule], *, dimension: int) -> SpectrumSummary:
    """The summary of a run's (or ``analyze``'s) probes: one computation for both."""
    ext = extreme_eigenvalues(rules)
    trace = trace_estimate(rules, dimension=dimension)
    return SpectrumSummary(lambda_max=ext.lambda_max, lambda_max_residual=ext.lambda_max_residual,
                           lambda_min=ext.lambda_min, lambda_min_residual=ext.lambda_min_residual, trace=trace.trace,
                           trace_stderr=trace.stderr if math.isfinite(trace.stderr) else float("nan"),
                           probes=len(rules))


def wasserstein1(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """W1 between two discrete measures on the line, each (values, weights): the integral of |F_a - F_b|."""
    va, wa = np.asarray(a[0], np.float64), np.asarray(a[1], np.float64)
    vb, wb = np.asarray(b[0], np.float64), np.asarray(b[1], np.float64)
    wa, wb = wa / wa.sum(), wb / wb.sum()
    points = np.concatenate([va, vb])
    order = np.argsort(points, kind="stable")
    mass = np.concatenate([wa, -wb])[order]
    cdf_diff = np.cumsum(mass)[:-1]
    gaps = np.diff(points[order])
    return float(np.sum(np.abs(cdf_diff) * gaps))
