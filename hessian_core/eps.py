"""Choosing the finite-difference step eps (the paper's Theorem 3.1 trade-off).

A central difference along a unit probe v errs by truncation ~ eps^2 |D^3 L[v,v]| / 6 and by round-off
~ eps_mach |grad L| / eps. Minimizing the sum gives eps* = (3 eps_mach |grad L| / |D^3 L[v,v]|)^(1/3).
|D^3 L[v,v]| / 6 is measured as |HVP(e1) - HVP(e2)| / (e1^2 - e2^2) from two steps in the truncation regime.
In low precision the step itself can be rounded away (theta + eps v == theta): the calibration measures
the fraction of the step the parameter dtype keeps, and says so when the HVP cannot be trusted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .hvp import FiniteDifferenceHVP
from .vectors import axpy_

DEFAULT_EPS: dict[torch.dtype, float] = {
    torch.float64: 6e-6,
    torch.float32: 5e-3,
    torch.bfloat16: 0.2,
    torch.float16: 5e-2,
}
# Steps for the truncation estimate start at LADDER_START * default and grow by LADDER_GROWTH until the
# difference of the two HVPs stands SIGNAL_TO_NOISE times above the predicted round-off.
LADDER_START = 16.0
LADDER_GROWTH = 4.0
LADDER_TRIES = 3
SIGNAL_TO_NOISE = 10.0
# Above this estimated relative error (or fraction of the step lost to rounding) the HVP is called unreliable.
UNRELIABLE = 0.5
EPS_DIGITS = 2


@dataclass(frozen=True)
class EpsChoice:
    eps: float
    source: str  # "fixed" | "auto" | "default" (auto could not measure the truncation term)
    relative_error: float  # estimated relative error of one HVP at eps (nan when unknown)
    grad_norm: float
    third_derivative: float  # |D^3 L[v,v]| estimate (nan when unknown)
    perturbation_rounding: float  # |round(theta + eps v) - theta - eps v| / |eps v|
    reliable: bool
    message: str
    grad_seconds: float = float("nan")  # wall time of the calibration's one gradient

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def default_eps(dtype: torch.dtype) -> float:
    if dtype not in DEFAULT_EPS:
        raise ValueError(f"no default eps for dtype {dtype}; expected one of {sorted(map(str, DEFAULT_EPS))}")
    return DEFAULT_EPS[dtype]


def round_eps(eps: float, digits: int = EPS_DIGITS) -> float:
    """eps to ``digits`` significant digits."""
    return float(f"{eps:.{digits - 1}e}")


def optimal_eps(*, eps_mach: float, grad_norm: float, third_derivative: float) -> float:
    """Theorem 3.1: the eps minimizing eps^2 |D3| / 6 + eps_mach |g| / eps."""
    return (3.0 * eps_mach * grad_norm / third_derivative) ** (1.0 / 3.0)


def predicted_error(eps: float, *, eps_mach: float, grad_norm: float, third_derivative: float) -> float:
    """The absolute error bound of Theorem 3.1 at eps."""
    return eps * eps * third_derivative / 6.0 + eps_mach * grad_norm / eps


def _distance(op: FiniteDifferenceHVP, a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    diff = [x.clone() for x in a]
    axpy_(diff, b, alpha=-1.0)
    return op.space.norm(diff)


def calibrate_eps(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, eps: float | None = None) -> EpsChoice:
    """Pick eps for ``op`` along the unit probe v, or (``eps`` given) assess that fixed step.

    ``op`` is immutable (steps are tried on ``op.with_eps`` copies); costs one gradient and 1 + k HVPs
    (k <= LADDER_TRIES tries). An auto eps is rounded to ``EPS_DIGITS`` significant digits: the optimum is flat,
    and the rounding makes the choice the same on any layout (reduction order moves the estimate in its last digits).
    """
    dtype = op.space.dtype
    eps_mach = float(torch.finfo(dtype).eps)
    fallback = default_eps(dtype)
    started = time.perf_counter()
    _, grad = op.gradient()
    grad_seconds = time.perf_counter() - started
    grad_norm = op.space.norm(grad)
    del grad
    third = float("nan")
    hv_norm = float("nan")
    # pairs (2e, e), then (4*2e, 2e), ...: each try after the first reuses the previous larger step's HVP
    e_small = LADDER_START * fallback / 2.0
    h_small = op.with_eps(e_small).matvec(v)
    e_big = LADDER_START * fallback
    for _ in range(LADDER_TRIES):
        h_big = op.with_eps(e_big).matvec(v)
        signal = _distance(op, h_big, h_small)
        hv_norm = op.space.norm(h_small)
        noise = eps_mach * grad_norm / e_small
        if math.isfinite(signal) and signal > SIGNAL_TO_NOISE * noise:
            third = 6.0 * signal / (e_big * e_big - e_small * e_small)
            break
        e_small, h_small = e_big, h_big
        e_big *= LADDER_GROWTH

    measured = math.isfinite(third) and third > 0 and grad_norm > 0
    if eps is not None:
        source = "fixed"
    elif measured:
        eps = round_eps(optimal_eps(eps_mach=eps_mach, grad_norm=grad_norm, third_derivative=third))
        source = "auto"
    else:
        eps, source = fallback, "default"
    if measured:
        abs_err = predicted_error(eps, eps_mach=eps_mach, grad_norm=grad_norm, third_derivative=third)
        rel = abs_err / hv_norm if hv_norm > 0 else float("inf")
    else:
        rel = float("nan")
    rounding = op.perturbation_rounding(v, eps)
    total = (0.0 if math.isnan(rel) else rel) + rounding
    reliable = math.isfinite(total) and total < UNRELIABLE
    dtype_name = str(dtype).removeprefix("torch.")
    if not measured:
        message = (f"eps={eps:.3g} ({source}): the truncation term could not be measured above "
                   f"round-off; relative error unknown")
    else:
        label = "auto, Theorem 3.1" if source == "auto" else "fixed"
        message = f"eps={eps:.3g} ({label}): estimated HVP relative error {rel:.2g}"
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if rounding > 0.1:
        remedy = "use float32 (or float64) parameters" if low_precision else "use a larger eps (or eps: auto)"
        message += (f"; {dtype_name} parameters round away {100 * min(rounding, 1.0):.0f}% of the step eps*v, "
                    f"so the HVP is mostly rounding noise: {remedy}")
    elif not reliable:
        if source == "fixed":
            message += "; this fixed eps gives an unreliable HVP: try eps: auto"
        else:
            message += (f"; at {dtype_name} precision no eps gives a reliable HVP here: "
                        f"use float32 (or float64) parameters")
    return EpsChoice(eps, source, rel, grad_norm, third, rounding, reliable, message, grad_seconds)


@dataclass(frozen=True)
class HVPErrorStudy:
    """The FD HVP's relative error against eps along one probe (the U shape of Theorem 3.1).

    ``rel_error_exact``: against the double-backward HVP (nan where it cannot run: sharded or flash models).
    ``rel_error_stable``: against the FD HVP at ``stable_eps``, the smaller step of the adjacent pair of grid
    steps whose HVPs agree best; this reference needs no double backward, so it exists at any scale.
    ``predicted``: Theorem 3.1's bound eps^2 |D3|/6 + eps_mach |g|/eps over |Hv| (central scheme only).
    """

    eps: list[float]  # ascending
    rel_error_exact: list[float]
    rel_error_stable: list[float]
    predicted: list[float]
    perturbation_rounding: list[float]
    stable_eps: float
    auto: EpsChoice
    auto_rel_error_exact: float
    auto_rel_error_stable: float
    exact_unavailable: str | None  # why there is no exact reference, or None

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["auto"] = self.auto.as_dict()
        return out


def hvp_error_study(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, eps_values: Sequence[float]) -> HVPErrorStudy:
    """Run ``op`` along the unit probe v at every eps and at the ``auto`` eps. Keeps one HVP per eps in memory
    (local shards), so it is a diagnostic for models whose shards fit that many times; costs len(eps) + ~6 HVPs."""
    from .hvp import ExactHVPUnavailable, exact_hvp

    eps_values = sorted(float(e) for e in eps_values)
    if len(eps_values) < 2 or eps_values[0] <= 0:
        raise ValueError(f"need at least two positive eps values, got {eps_values}")
    auto = calibrate_eps(op, v)
    try:
        exact, reason = exact_hvp(op.model, op.batches, v=v), None
    except ExactHVPUnavailable as e:
        exact, reason = None, str(e)
    except torch.OutOfMemoryError:  # double backward needs ~2x a gradient's memory; the FD study still runs
        exact, reason = None, "the exact (double-backward) HVP ran out of memory"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results = [op.with_eps(eps).matvec(v) for eps in eps_values + [auto.eps]]
    fd, at_auto = results[:-1], results[-1]
    norms = [op.space.norm(h) for h in fd]  # each a pass and an all-reduce: computed once
    exact_norm = op.space.norm(exact) if exact is not None else float("nan")

    def rel(a: Sequence[Tensor], b: Sequence[Tensor], norm_b: float) -> float:
        return _distance(op, a, b) / norm_b if norm_b > 0 else float("nan")

    agreement = [rel(fd[k], fd[k + 1], norms[k + 1]) for k in range(len(fd) - 1)]
    finite = [k for k, a in enumerate(agreement) if math.isfinite(a) and norms[k] > 0]
    stable = min(finite, key=lambda k: agreement[k]) if finite else len(fd) - 1
    reference_norm = exact_norm if exact is not None else norms[stable]
    eps_mach = float(torch.finfo(op.space.dtype).eps)
    measured = math.isfinite(auto.third_derivative) and auto.third_derivative > 0 and op.scheme == "central"
    nan = float("nan")
    return HVPErrorStudy(
        eps=eps_values,
        rel_error_exact=[rel(h, exact, exact_norm) if exact is not None else nan for h in fd],
        rel_error_stable=[rel(h, fd[stable], norms[stable]) for h in fd],
        predicted=[predicted_error(e, eps_mach=eps_mach, grad_norm=auto.grad_norm,
                                   third_derivative=auto.third_derivative) / reference_norm if measured else nan
                   for e in eps_values],
        perturbation_rounding=[op.perturbation_rounding(v, e) for e in eps_values],
        stable_eps=eps_values[stable],
        auto=auto,
        auto_rel_error_exact=rel(at_auto, exact, exact_norm) if exact is not None else nan,
        auto_rel_error_stable=rel(at_auto, fd[stable], norms[stable]),
        exact_unavailable=reason,
    )
