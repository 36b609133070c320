"""Error bars on the extreme eigenvalues a run reports: Lanczos's own error plus the FD HVP's.

Two independent sources:
- Ritz residual: each Ritz value theta lies within |beta_m s_m| of an eigenvalue of the operator Lanczos saw.
- FD HVP error: the operator Lanczos saw is H + E, not H. If one HVP's relative error is r, then
  |E v| <= r |H v| <= r ||H|| for unit v, so ||E|| <= r ||H||, and by Weyl's inequality every eigenvalue of
  H + E lies within r ||H|| of the matching eigenvalue of H. ||H|| is estimated by the largest |Ritz value|
  plus its residual. (The paper's Theorem 4.1 bounds the same shift more finely through the step and the
  fourth derivative; it is not computed here.)
r is the eps calibration's estimate along one random probe. Along the extreme eigenvectors, where the
curvature itself changes fastest, the step's truncation error is larger: on the tests' tiny GPT-NeoX at the
auto eps, the extreme eigenvalues moved up to 3.1x (float64), and 4.0x (float32 master / bfloat16 compute,
lambda_min) further than r ||H||. The bound therefore uses DIRECTION_FACTOR * r: an empirical allowance fitted
on that one model, not a guarantee (docs/precision.md, "Error bars"). It was fitted on the central scheme; the
forward scheme's r is its own rule's estimate (``hessian_core.eps``), and its truncation along the extreme
directions (eps |D3[u,u]| / 2, first order) was not measured against the factor.
The reported bar is the sum of the two: lambda = X +- (ritz + fd).
Top-k eigenpairs (``hessian_core.eigenpairs``, the pipeline's eigen task) have their eigenvectors, and measure
the FD part along each one instead (``rayleigh_fd_bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


DIRECTION_FACTOR = 5.0


@dataclass(frozen=True)
class ErrorBar:
    value: float
    ritz_residual: float
    fd_bound: float  # nan when the HVP's relative error is unknown

    @property
    def total(self) -> float:
        return self.ritz_residual + (0.0 if math.isnan(self.fd_bound) else self.fd_bound)

    def as_dict(self, name: str) -> dict:
        return {f"{name}_fd_bound": self.fd_bound, f"{name}_error": self.total}


def operator_norm_estimate(*, lambda_max: float, lambda_max_residual: float, lambda_min: float,
                           lambda_min_residual: float) -> float:
    return max(abs(lambda_max) + lambda_max_residual, abs(lambda_min) + lambda_min_residual)


def fd_eigenvalue_bound(*, hvp_relative_error: float | None, operator_norm: float) -> float:
    """Weyl: every eigenvalue moves by at most ||E|| <= r ||H|| (r from a random probe, times DIRECTION_FACTOR
    for the extreme directions); nan when r is unknown."""
    if hvp_relative_error is None or not math.isfinite(hvp_relative_error):
        return float("nan")
    return DIRECTION_FACTOR * hvp_relative_error * operator_norm


# Each eigenvalue's own FD bar (top-k eigenpairs, ``hessian_core.eigenpairs``): the Weyl bound above, with its
# probe-fitted DIRECTION_FACTOR, fell 17x short of the true error on an SA pair of the tests' tiny Llama. Along
# one eigenvector u the operator's truncation is measured instead: the FD Rayleigh quotient RQ(e) = <u, H_e u> is
# <u, H u> + C e^p + O(e^(p+2)) (p = SCHEME_ORDER), so RQ(2 eps) - RQ(eps) = (2^p - 1) C eps^p to leading order
# (Richardson) and the truncation at eps is that difference over 2^p - 1, times RICHARDSON_SAFETY for the next
# term (forward: p = 1, and the next term is O(e^2), not O(e^3)). The FD HVP is not linear in v (its truncation is cubic in v), so the solver's Ritz value theta, a
# combination of HVPs along many Lanczos vectors, is not RQ(eps) itself: their measured difference is added.
# The round-off part is the one the Weyl bound also carries: one HVP's c / eps (c = eps_mach |grad L|, or the
# calibration's measured coefficient), times the stencil's ROUNDING_GAIN, bounds |<u, E u>| for a unit u.
SCHEME_ORDER = {"central": 2, "richardson": 4, "forward": 1}
RICHARDSON_SAFETY = 2.0
# sum |c_k| / divisor of the stencil (hessian_core.hvp.rounding_gain)
ROUNDING_GAIN = {"central": 1.0, "richardson": 18.0 / 12.0, "forward": 2.0}


@dataclass(frozen=True)
class RayleighBound:
    """One eigenvalue's FD bar and its parts: ``truncation`` (Richardson, with RICHARDSON_SAFETY), ``mismatch``
    |theta - RQ(eps)|, ``rounding`` (nan parts count as 0 in ``total``; all nan: unknown)."""

    truncation: float
    mismatch: float
    rounding: float

    @property
    def total(self) -> float:
        parts = [p for p in (self.truncation, self.mismatch, self.rounding) if not math.isnan(p)]
        return sum(parts) if parts else float("nan")


def rayleigh_fd_bound(*, ritz_value: float, rq_eps: float, rq_2eps: float, eps: float, roundoff: float | None,
                      scheme: str = "central") -> RayleighBound:
    """The FD HVP's part of one eigenvalue's bar from the Rayleigh quotients of its eigenvector at eps and 2 eps
    (two HVPs; see above). ``roundoff``: c of one HVP's round-off c / eps (None or nan: not counted)."""
    if scheme not in SCHEME_ORDER:
        raise ValueError(f"scheme {scheme!r}: expected one of {sorted(SCHEME_ORDER)}")
    truncation = RICHARDSON_SAFETY * abs(rq_2eps - rq_eps) / (2 ** SCHEME_ORDER[scheme] - 1)
    rounding = (float("nan") if roundoff is None or not math.isfinite(roundoff)
                else ROUNDING_GAIN[scheme] * roundoff / eps)
    return RayleighBound(truncation, abs(ritz_value - rq_eps), rounding)


# a bar wider than this fraction of its eigenvalue: the FD step is far outside the regime the Richardson estimate
# assumes (measured on the demo model at the float32 auto eps: bar 12 on 22.5, true error 19.3), so the bar is a
# warning sign, not a bound
WIDE_BAR_FRACTION = 0.05


def wide_bars(eigenvalues, errors, *, fraction: float = WIDE_BAR_FRACTION) -> list[int]:
    """Indices of the eigenvalues whose FD bar exceeds ``fraction`` of |eigenvalue|: for those, the eps is too large
    along that eigenvector and the bar may not cover the error (a smaller ``hvp.eps`` is the remedy)."""
    return [i for i, (value, error) in enumerate(zip(eigenvalues, errors))
            if not error <= fraction * abs(value)]


def extreme_error_bars(summary: dict, *, hvp_relative_error: float | None) -> dict[str, ErrorBar]:
    """Bars for ``lambda_max`` and ``lambda_min`` of a run summary (run.json's ``summary``)."""
    norm = operator_norm_estimate(lambda_max=summary["lambda_max"], lambda_max_residual=summary["lambda_max_residual"],
                                  lambda_min=summary["lambda_min"], lambda_min_residual=summary["lambda_min_residual"])
    fd = fd_eigenvalue_bound(hvp_relative_error=hvp_relative_error, operator_norm=norm)
    return {name: ErrorBar(summary[name], summary[f"{name}_residual"], fd) for name in ("lambda_max", "lambda_min")}


def summary_error_fields(summary: dict, *, hvp_relative_error: float | None) -> dict:
    """The fields run.json's summary gains: ``lambda_max_fd_bound``, ``lambda_max_error`` (ritz + fd), and the
    same for lambda_min, plus ``hvp_relative_error`` they were computed from."""
    bars = extreme_error_bars(summary, hvp_relative_error=hvp_relative_error)
    out = {"hvp_relative_error": hvp_relative_error}
    for name, bar in bars.items():
        out.update(bar.as_dict(name))
    return out


def format_error_bar(name: str, bar: ErrorBar) -> str:
    """``lambda_max = 28.1 +- 0.31 (Ritz residual 0.0012, FD HVP 0.31)``."""
    fd = "unknown" if math.isnan(bar.fd_bound) else f"{bar.fd_bound:.2g}"
    return f"{name} = {bar.value:.6g} +- {bar.total:.2g} (Ritz residual {bar.ritz_residual:.2g}, FD HVP {fd})"
