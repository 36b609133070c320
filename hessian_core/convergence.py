"""When SLQ has seen enough: the stopping rules behind ``lanczos.steps: auto`` (per probe, decided inside the probe's
own loop) and ``lanczos.probes: auto`` (per run, decided as probes finish).

A probe stops at step m once both hold, with width = its largest minus its smallest Ritz value:
- its extreme Ritz values are converged: the residual bound of each (|beta_m x last eigenvector component|, a
  bound on its distance to an eigenvalue) is at most ``tol`` x width;
- its quadrature rule has settled: the 1-Wasserstein distance between the rule at step m and the rule ``lag``
  steps earlier is at most ``tol`` x width (the rule's cumulative distribution no longer moves).
The rule is a pure function of the recurrence's coefficients, so a probe resumed from a checkpoint stops at the
same step as one never interrupted.

A run has enough probes once both hold:
- the trace's standard error (Hutchinson over the probes) is at most ``trace_rtol`` x |trace|;
- the SLQ measure of the first half of the probes (by probe id) is within ``density_tol`` x width of the second
  half's, in W1, width being the whole measure's. The raw atoms are compared: a smoothing kernel shared by both
  halves can only shrink W1, so the smoothed densities are at least as close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .quadrature import RitzRule, SpectralMeasure, ritz_rule, trace_estimate, wasserstein1

DEFAULT_LAG = 5  # "a few steps back": the rule now against the rule this many steps before


@dataclass(frozen=True, kw_only=True)
class ProbeConvergence:
    """The figures the per-probe rule compares with ``tol``, each relative to the rule's width."""

    step: int
    width: float
    extreme_residual: float  # max of the two extremes' residual bounds / width
    settled: float  # W1(rule now, rule lag steps back) / width (inf before there are lag + 1 steps)

    def holds(self, tol: float) -> bool:
        return self.extreme_residual <= tol and self.settled <= tol


def probe_convergence(alphas: Sequence[float], betas: Sequence[float], *, lag: int = DEFAULT_LAG) -> ProbeConvergence:
    """The per-probe figures after len(alphas) steps (betas[-1] is the current residual norm)."""
    m = len(alphas)
    now = ritz_rule(alphas, betas)
    width = float(now.values[-1] - now.values[0])
    if m <= lag or not width > 0:
        return ProbeConvergence(step=m, width=width, extreme_residual=math.inf, settled=math.inf)
    before = ritz_rule(alphas[:m - lag], betas[:m - lag])
    extreme = max(float(now.residuals[0]), float(now.residuals[-1])) / width
    settled = wasserstein1((now.values, now.weights), (before.values, before.weights)) / width
    return ProbeConvergence(step=m, width=width, extreme_residual=extreme, settled=settled)


@dataclass(frozen=True, kw_only=True)
class ProbeStopRule:
    """``lanczos.steps: auto``: call after each step with the coefficients so far; True once the probe may stop.
    ``min_steps`` guards against a rule that looks settled only because it has too few nodes to move."""

    tol: float
    lag: int = DEFAULT_LAG
    min_steps: int = 2 * DEFAULT_LAG

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.lag < 1 or self.min_steps < self.lag + 1:
            raise ValueError(f"lag must be >= 1 and min_steps > lag, got lag={self.lag}, min_steps={self.min_steps}")

    def __call__(self, alphas: Sequence[float], betas: Sequence[float]) -> bool:
        if len(alphas) < self.min_steps:
            return False
        return probe_convergence(alphas, betas, lag=self.lag).holds(self.tol)


@dataclass(frozen=True, kw_only=True)
class ProbesConvergence:
    """The per-run figures over the finished probes."""

    probes: int
    trace: float
    trace_stderr: float
    trace_rel_stderr: float  # trace_stderr / |trace| (inf with fewer than 2 probes)
    halves_w1: float  # W1(first half's measure, second half's) / width (inf with fewer than 2 probes)

    def holds(self, *, trace_rtol: float, density_tol: float) -> bool:
        return self.trace_rel_stderr <= trace_rtol and self.halves_w1 <= density_tol

    def as_record(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}


def probes_convergence(rules: Sequence[RitzRule], *, dimension: int) -> ProbesConvergence:
    """The per-run figures of ``rules`` (finished probes in probe-id order)."""
    n = len(rules)
    if n < 2:
        trace = trace_estimate(rules, dimension=dimension).trace if rules else math.nan
        return ProbesConvergence(probes=n, trace=trace, trace_stderr=math.inf, trace_rel_stderr=math.inf,
                                 halves_w1=math.inf)
    trace = trace_estimate(rules, dimension=dimension)
    rel = trace.stderr / abs(trace.trace) if trace.trace != 0 else math.inf
    whole = SpectralMeasure.from_rules(rules)
    width = float(whole.values[-1] - whole.values[0])
    first, second = (SpectralMeasure.from_rules(part) for part in (rules[:n // 2], rules[n // 2:]))
    w1 = wasserstein1((first.values, first.weights), (second.values, second.weights))
    return ProbesConvergence(probes=n, trace=trace.trace, trace_stderr=trace.stderr, trace_rel_stderr=rel,
                             halves_w1=w1 / width if width > 0 else math.inf)


def relative_w1(a: SpectralMeasure, b: SpectralMeasure) -> float:
    """W1(a, b) over the width of their union's support: the density target's measure."""
    lo = min(float(a.values[0]), float(b.values[0]))
    hi = max(float(a.values[-1]), float(b.values[-1]))
    return wasserstein1((a.values, a.weights), (b.values, b.weights)) / (hi - lo) if hi > lo else 0.0


__all__ = ["ProbeConvergence", "ProbeStopRule", "ProbesConvergence", "probe_convergence", "probes_convergence",
           "relative_w1", "DEFAULT_LAG"]
