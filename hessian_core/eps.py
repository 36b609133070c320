"""Choosing the finite-difference step eps (the paper's Theorem 3.1 trade-off).

A central difference along a unit probe v errs by truncation ~ eps^2 |D^3 L[v,v]| / 6 and by round-off
~ eps_mach |grad L| / eps. Minimizing the sum gives eps* = (3 eps_mach |grad L| / |D^3 L[v,v]|)^(1/3).
|D^3 L[v,v]| / 6 is measured as |HVP(e1) - HVP(e2)| / (e1^2 - e2^2) from two steps in the truncation regime.
In low precision the step itself can be rounded away (theta + eps v == theta): the calibration measures
the fraction of the step the parameter dtype keeps, and says so when the HVP cannot be trusted.
Under mixed precision (float32 master parameters, bfloat16 compute) the round-off term is the compute dtype's:
its coefficient is measured from one HVP deep in the round-off regime, while the step's rounding is checked
in the master dtype, where the perturbation lands.

The forward scheme (``hvp.scheme: forward``, one gradient pass an HVP) has its own rule, the same trade-off for
an O(eps) truncation: it errs by ~ eps |D^3 L[v,v]| / 2 and by round-off ~ 2 eps_mach |grad L| / eps (two
gradients' rounding over eps, ``hessian_core.hvp.rounding_gain``), so eps* = 2 (eps_mach |grad L| / |D^3 L[v,v]|)^(1/2)
with error 2 (eps_mach |grad L| |D^3 L[v,v]|)^(1/2) there. |D^3 L[v,v]| is measured the same way, from a ladder of
forward HVPs: |HVP(e1) - HVP(e2)| / (e1 - e2) is |D3| / 2. Richardson keeps the central rule (as before).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .hvp import FiniteDifferenceHVP, rounding_gain
from .vectors import Vector, axpy_

DEFAULT_EPS: dict[torch.dtype, float] = {
    torch.float64: 6e-6,
    torch.float32: 5e-3,
    torch.bfloat16: 0.2,
    torch.float16: 5e-2,
}
# The forward scheme's safe step is the central one to the power 3/2: both are set by eps_mach (central
# ~ eps_mach^(1/3), forward ~ eps_mach^(1/2): 1.5e-8 in float64, 3.5e-4 in float32).
FORWARD_DEFAULT_POWER = 1.5
# The truncation ladder's first step is FIRST_STEP times the default step (for float32 0.0625: between the
# optima measured on the demo model, 0.041, and the benchmark model, 0.1, so that the first step is often
# close enough to be the chosen eps); its HVPs must differ SIGNAL_TO_NOISE times above the predicted
# round-off: the larger step is sized from a guess of |D3| allowed to be GUESS_MARGIN times too large, later
# ones grow by LADDER_GROWTH.
FIRST_STEP = 12.5
# Under mixed precision the first step stays at 8x the default: the auto eps never is a ladder step there
# (``_auto_eps``), and at 12.5x the error estimate fell short of the true error on the tests' tiny model.
MIXED_FIRST_STEP = 8.0
# The forward scheme's first steps: where its optimum lies if the central optimum lies at FIRST_STEP (or
# MIXED_FIRST_STEP) times the central default, i.e. for |grad| / |D3| = first^3 / (3 eps_mach), the forward
# optimum 2 (eps_mach |grad| / |D3|)^(1/2) is 2 first^(3/2) / sqrt(3) times the forward default (51x, 26x).
def _forward_first_step(central_first: float) -> float:
    return 2.0 * central_first ** 1.5 / math.sqrt(3.0)


GUESS_MARGIN = 16.0
LADDER_GROWTH = 4.0
LADDER_TRIES = 3
SIGNAL_TO_NOISE = 10.0
# An auto eps is one of the ladder's steps (whose HVP is at hand) when that step's predicted error is within
# this factor of the optimum's: a step within 0.6x-1.6x of it.
SNAP_TOLERANCE = 1.25
# Mixed precision: the default step is the compute dtype's shrunk by this (storage no longer rounds the step),
# and the round-off is measured at a step this many times below the ladder's smaller step.
MIXED_DEFAULT_SHRINK = 4.0
NOISE_STEP_SHRINK = 64.0
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
    perturbation_rounding: float  # |round(theta + eps v) - theta - eps v| / |eps v|, in the master dtype
    reliable: bool
    message: str
    grad_seconds: float = float("nan")  # wall time of the calibration's first gradient pass
    compute_dtype: str = ""  # the dtype forward/backward ran in ("" in records from before mixed precision)
    # c in the round-off of one gradient, c / eps in a central HVP, rounding_gain(scheme) x c / eps in any scheme's
    roundoff: float = float("nan")
    roundoff_source: str = ""  # "eps_mach*|grad|" (compute dtype's eps_mach) | "measured" (mixed precision)
    scheme: str = ""  # the HVP scheme whose error rule was applied ("" in records from before the forward scheme)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def default_eps(dtype: torch.dtype, compute_dtype: torch.dtype | None = None, scheme: str = "central") -> float:
    """A safe step for parameters stored in ``dtype``; with a lower ``compute_dtype`` the compute dtype's
    round-off dominates, so its default, shrunk by MIXED_DEFAULT_SHRINK: the step is not rounded at storage.
    ``scheme="forward"``: the defaults to the power FORWARD_DEFAULT_POWER (its optimum is sqrt(eps_mach)-sized)."""
    for d in (dtype, compute_dtype):
        if d is not None and d not in DEFAULT_EPS:
            raise ValueError(f"no default eps for dtype {d}; expected one of {sorted(map(str, DEFAULT_EPS))}")

    def default(d: torch.dtype) -> float:
        return DEFAULT_EPS[d] ** FORWARD_DEFAULT_POWER if scheme == "forward" else DEFAULT_EPS[d]

    if compute_dtype is None or compute_dtype == dtype:
        return default(dtype)
    return max(default(dtype), default(compute_dtype) / MIXED_DEFAULT_SHRINK)


def error_model(eps: float, *, roundoff: float, third_derivative: float, scheme: str = "central") -> float:
    """The absolute error of one FD HVP at eps, with c = ``roundoff`` (one gradient's round-off coefficient).
    Central (Theorem 3.1; richardson is assessed with it too): truncation eps^2 |D3| / 6 plus round-off c / eps.
    Forward: truncation eps |D3| / 2 plus round-off 2 c / eps."""
    if scheme == "forward":
        return eps * third_derivative / 2.0 + rounding_gain("forward") * roundoff / eps
    return eps * eps * third_derivative / 6.0 + roundoff / eps


def round_eps(eps: float, digits: int = EPS_DIGITS) -> float:
    """eps to ``digits`` significant digits."""
    return float(f"{eps:.{digits - 1}e}")


def _optimum(*, roundoff: float, third_derivative: float, scheme: str = "central") -> float:
    """The eps minimizing ``error_model``: (3 c / |D3|)^(1/3) (central), 2 (c / |D3|)^(1/2) (forward)."""
    if scheme == "forward":
        return math.sqrt(2.0 * rounding_gain("forward") * roundoff / third_derivative)
    return (3.0 * roundoff / third_derivative) ** (1.0 / 3.0)


def optimal_eps(*, eps_mach: float, grad_norm: float, third_derivative: float, scheme: str = "central") -> float:
    """Theorem 3.1: the eps minimizing eps^2 |D3| / 6 + eps_mach |g| / eps; forward: eps |D3| / 2 + 2 eps_mach |g| / eps."""
    return _optimum(roundoff=eps_mach * grad_norm, third_derivative=third_derivative, scheme=scheme)


def predicted_error(eps: float, *, eps_mach: float, grad_norm: float, third_derivative: float,
                    scheme: str = "central") -> float:
    """The absolute error bound of Theorem 3.1 (or of its forward analogue) at eps."""
    return error_model(eps, roundoff=eps_mach * grad_norm, third_derivative=third_derivative, scheme=scheme)


def _truncation(e_big: float, e_small: float, scheme: str) -> float:
    """How much larger the truncation is at e_big than at e_small per unit |D3|: (e_big^2 - e_small^2) / 6 (central),
    (e_big - e_small) / 2 (forward)."""
    if scheme == "forward":
        return (e_big - e_small) / 2.0
    return (e_big ** 2 - e_small ** 2) / 6.0


def _distance(op: FiniteDifferenceHVP, a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    diff = [x.clone() for x in a]
    axpy_(diff, b, alpha=-1.0)
    return op.space.norm(diff)


@dataclass
class _LadderStep:
    """One HVP of the calibration along its probe: the step, the HVP there, and its wall time."""

    eps: float
    hvp: Vector
    seconds: float


def _step_at(op: FiniteDifferenceHVP, v: Sequence[Tensor], eps: float) -> _LadderStep:
    started = time.perf_counter()
    hvp = op.with_eps(eps).matvec(v)  # the operator is immutable: a copy at eps (sharing its buffers)
    return _LadderStep(eps, hvp, time.perf_counter() - started)


def _first_step(op: FiniteDifferenceHVP, v: Sequence[Tensor], eps: float) -> tuple[_LadderStep, float, float]:
    """The ladder's first HVP, |grad L| and the seconds of one gradient pass. |grad L| takes a pass of its own:
    the HVP accumulates its two gradients into one buffer, so neither is ever held alone."""
    started = time.perf_counter()
    grad_norm = op.gradient_norm()
    grad_seconds = time.perf_counter() - started
    return _step_at(op, v, eps), grad_norm, grad_seconds


@dataclass
class _Ladder:
    """What the truncation ladder measured: |D3| (nan if never above round-off), |Hv| at the smaller step, and
    the last pair's two HVPs (the larger is None when the ladder stopped without one)."""

    third: float
    hv_norm: float
    smaller: _LadderStep
    larger: _LadderStep | None


def _hvp_roundoff(roundoff: float, scheme: str) -> float:
    """One HVP's round-off coefficient: c x 2 under the forward scheme; central (and richardson) as before."""
    return rounding_gain("forward") * roundoff if scheme == "forward" else roundoff


def _truncation_ladder(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, first: _LadderStep, roundoff: float,
                       grad_norm: float) -> _Ladder:
    """|D3| from two steps whose HVPs differ SIGNAL_TO_NOISE times above the round-off c / eps (2 c / eps
    under the forward scheme, whose truncation difference is (e_big - e_small) |D3| / 2).

    The first HVP (``first``) also sizes the larger step: |D3| is guessed as |Hv|^2 / |grad| (the loss's
    scale along v), and the larger step is the one whose signal would clear the bar even if that guess were
    GUESS_MARGIN times too large (bounded by ``_sized_step``). A pair that fails is followed by
    (LADDER_GROWTH * e, e) pairs, each reusing the previous larger step's HVP. One pair (2 HVPs) usually does."""
    small = first
    hv_norm = op.space.norm(small.hvp)
    noise = _hvp_roundoff(roundoff, op.scheme)
    e_big = _sized_step(small.eps, hv_norm=hv_norm, grad_norm=grad_norm, roundoff=noise, scheme=op.scheme)
    for _ in range(LADDER_TRIES):
        big = _step_at(op, v, e_big)
        signal = _distance(op, big.hvp, small.hvp)
        if math.isfinite(signal) and signal > SIGNAL_TO_NOISE * noise / small.eps:
            return _Ladder(signal / _truncation(big.eps, small.eps, op.scheme), hv_norm, small, big)
        small = big
        hv_norm = op.space.norm(small.hvp)
        e_big *= LADDER_GROWTH
    return _Ladder(float("nan"), hv_norm, small, None)


def _sized_step(e_small: float, *, hv_norm: float, grad_norm: float, roundoff: float,
                scheme: str = "central") -> float:
    """The larger ladder step for a pair with ``e_small``: signal (e^2 - e_small^2) |D3| / 6 (forward:
    (e - e_small) |D3| / 2) above SIGNAL_TO_NOISE * roundoff / e_small (``roundoff``: one HVP's) for
    |D3| = (|Hv|^2 / |grad|) / GUESS_MARGIN.

    It stays between 2x and 32x e_small and below a quarter of the loss's length scale |grad| / |Hv| along v,
    where the eps^2 truncation model still holds (a step of that scale measures a |D3| that is far too small).
    It is rounded to EPS_DIGITS digits, like the auto eps: the calibration may choose it, and must choose the
    same step on any layout."""
    lo = 2.0 * e_small
    if not (hv_norm > 0 and grad_norm > 0 and math.isfinite(hv_norm)):
        return lo
    third_guess = hv_norm * hv_norm / grad_norm / GUESS_MARGIN
    if scheme == "forward":
        wanted = e_small + 2.0 * SIGNAL_TO_NOISE * roundoff / (e_small * third_guess)
    else:
        wanted = math.sqrt(6.0 * SIGNAL_TO_NOISE * roundoff / (e_small * third_guess) + e_small * e_small)
    return round_eps(max(lo, min(wanted, 32.0 * e_small, 0.25 * grad_norm / hv_norm)))


def _measured_roundoff(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, h_ref, e_ref: float, third: float) -> float:
    """The round-off coefficient c of c / eps, from one HVP at a step deep in the round-off regime (returned
    per gradient, as ``EpsChoice.roundoff``: a forward HVP's measured coefficient over its rounding gain 2).

    Mixed precision rounds twice in ways eps_mach |grad| does not describe: the gradient is computed in the
    compute dtype, and casting theta + eps v to it rounds the step to the compute dtype's grid. At a step
    NOISE_STEP_SHRINK times below e_ref the difference from the HVP at e_ref is round-off (truncation there is
    NOISE_STEP_SHRINK^2 times smaller than at e_ref), so c = step * |HVP(step) - HVP(e_ref)|."""
    step = e_ref / NOISE_STEP_SHRINK
    h = op.with_eps(step).matvec(v)
    c = step * _distance(op, h, h_ref)
    if op.scheme == "forward":
        # The forward ladder's smaller step can lie well above the forward optimum (on the tests' tiny float64
        # models 10x), where its truncation is as large as the round-off at e_ref / 64; the two vectors are
        # uncorrelated (systematic against rounding noise), so the truncation comes off in quadrature: taken
        # off linearly it left 0.1-0.5x of the true round-off there.
        truncation = step * _truncation(e_ref, step, "forward") * third
        c = math.sqrt(max(c * c - truncation * truncation, 0.0)) if math.isfinite(c) else float("nan")
        return c / rounding_gain("forward")
    truncation_at_ref = e_ref * e_ref * third / 6.0  # part of the difference that is not round-off
    return max(c - step * truncation_at_ref, 0.0) if math.isfinite(c) else float("nan")


def _auto_eps(ladder: _Ladder, *, roundoff: float, snap: bool = True, scheme: str = "central") -> float:
    """Theorem 3.1's eps, rounded to EPS_DIGITS digits; or one of the ladder's own steps when its predicted error
    is within SNAP_TOLERANCE of the optimum's: the optimum is flat, and that step's HVP is already computed
    (it becomes the probe's first Lanczos matvec instead of one more HVP). ``snap=False`` under mixed
    precision: its estimate of the optimum is the least accurate (0.4-0.75x of a sweep's best), and a step
    up to 1.6x off it could leave the 3x band. ``scheme``: whose error model (forward: within 0.5x-2x)."""
    optimum = _optimum(roundoff=roundoff, third_derivative=ladder.third, scheme=scheme)

    def error(e: float) -> float:
        return error_model(e, roundoff=roundoff, third_derivative=ladder.third, scheme=scheme)

    near = [s.eps for s in (ladder.smaller, ladder.larger)
            if snap and s is not None and error(s.eps) <= SNAP_TOLERANCE * error(optimum)]
    return min(near, key=error) if near else round_eps(optimum)


@dataclass(frozen=True)
class Calibrated:
    """The calibration's choice, and the HVP along its probe at the chosen eps when the calibration computed
    one (a ladder step it chose; otherwise None), with that HVP's wall time."""

    choice: EpsChoice
    hvp: Vector | None
    hvp_seconds: float


def calibrate_eps(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, eps: float | None = None,
                  compute_dtype: torch.dtype | None = None) -> EpsChoice:
    """Pick eps for ``op`` along the unit probe v, or (``eps`` given) assess that fixed step (see
    ``calibrate``, which also returns the HVP at the chosen eps when it has one)."""
    return calibrate(op, v, eps=eps, compute_dtype=compute_dtype).choice


def calibrate(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, eps: float | None = None,
              compute_dtype: torch.dtype | None = None) -> Calibrated:
    """Pick eps for ``op`` along the unit probe v, or (``eps`` given) assess that fixed step.

    ``compute_dtype``: the dtype forward/backward run in when it is lower than the parameters' (FSDP2 mixed
    precision): its eps_mach sets the round-off term, which is then measured with one more HVP; the rounding
    of the step itself is checked in the parameters' (master) dtype.
    ``op`` is immutable (steps are tried on ``op.with_eps`` copies); costs 1 + k HVPs (k <= LADDER_TRIES
    tries), plus one under mixed precision, plus a gradient (the forward scheme's gradient at theta, which its
    HVPs then reuse). ``op.scheme`` picks the error rule: forward has its own (module docstring). An auto eps
    is rounded to ``EPS_DIGITS`` significant digits, or is one of the ladder's steps (``_auto_eps``): the
    optimum is flat, and the rounding makes the choice the same on any layout (reduction order moves the
    estimate in its last digits).
    """
    dtype = op.space.dtype
    compute = compute_dtype or dtype
    eps_mach = float(torch.finfo(compute).eps)
    scheme = "forward" if op.scheme == "forward" else "central"  # richardson is assessed with the central rule
    fallback = default_eps(dtype, compute, scheme=scheme)
    first_factor = FIRST_STEP if compute == dtype else MIXED_FIRST_STEP
    first_step = (_forward_first_step(first_factor) if scheme == "forward" else first_factor) * fallback
    first, grad_norm, grad_seconds = _first_step(op, v, first_step)
    roundoff, roundoff_source = eps_mach * grad_norm, "eps_mach*|grad|"
    ladder = _truncation_ladder(op, v, first=first, roundoff=roundoff, grad_norm=grad_norm)
    del first
    third, hv_norm = ladder.third, ladder.hv_norm
    measured = math.isfinite(third) and third > 0 and grad_norm > 0
    # The forward scheme measures its round-off in every precision (one more pass, 4 in all, still fewer than
    # the central calibration's 5): its optimum and error go as sqrt(c), and on the float32 demo model the
    # gradient's round-off was 4-5x eps_mach |grad L| (a trained model's small gradient is a sum of large,
    # cancelling per-token terms), which put the estimate at the auto eps 2.9x below the measured error.
    if measured and (compute != dtype or scheme == "forward"):
        ladder.larger = None  # at most two vectors held while the round-off is measured
        c = _measured_roundoff(op, v, h_ref=ladder.smaller.hvp, e_ref=ladder.smaller.eps, third=third)
        if math.isfinite(c) and c > 0:
            roundoff, roundoff_source = c, "measured"
    if eps is not None:
        source = "fixed"
    elif measured:
        eps, source = _auto_eps(ladder, roundoff=roundoff, snap=compute == dtype, scheme=scheme), "auto"
    else:
        eps, source = fallback, "default"
    kept = next((s for s in (ladder.smaller, ladder.larger) if s is not None and s.eps == eps), None)
    del ladder
    if measured:
        abs_err = error_model(eps, roundoff=roundoff, third_derivative=third, scheme=scheme)
        rel = abs_err / hv_norm if hv_norm > 0 else float("inf")
    else:
        rel = float("nan")
    rounding = op.perturbation_rounding(v, eps)
    total = (0.0 if math.isnan(rel) else rel) + rounding
    reliable = math.isfinite(total) and total < UNRELIABLE
    message = _calibration_message(eps=eps, source=source, measured=measured, rel=rel, rounding=rounding,
                                   reliable=reliable, dtype=dtype, compute=compute, scheme=scheme)
    choice = EpsChoice(eps, source, rel, grad_norm, third, rounding, reliable, message, grad_seconds,
                       compute_dtype=str(compute).removeprefix("torch."), roundoff=roundoff,
                       roundoff_source=roundoff_source, scheme=op.scheme)
    return Calibrated(choice, kept.hvp if kept else None, kept.seconds if kept else float("nan"))


def _calibration_message(*, eps: float, source: str, measured: bool, rel: float, rounding: float, reliable: bool,
                         dtype: torch.dtype, compute: torch.dtype, scheme: str = "central") -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    precision = dtype_name if compute == dtype else f"{dtype_name} master / {str(compute).removeprefix('torch.')} compute"
    if not measured:
        message = (f"eps={eps:.3g} ({source}): the truncation term could not be measured above "
                   f"round-off; relative error unknown")
    else:
        rule = "forward-difference rule" if scheme == "forward" else "Theorem 3.1"
        label = f"auto, {rule}" if source == "auto" else ("fixed, forward" if scheme == "forward" else "fixed")
        message = f"eps={eps:.3g} ({label}, {precision}): estimated HVP relative error {rel:.2g}"
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if rounding > 0.1:
        remedy = ("use float32 (or float64) parameters, e.g. model.dtype=float32 with model.compute_dtype=bfloat16"
                  if low_precision else "use a larger eps (or eps: auto)")
        message += (f"; {dtype_name} parameters round away {100 * min(rounding, 1.0):.0f}% of the step eps*v, "
                    f"so the HVP is mostly rounding noise: {remedy}")
    elif not reliable:
        if source == "fixed":
            message += "; this fixed eps gives an unreliable HVP: try eps: auto"
        else:
            message += (f"; at {precision} precision no eps gives a reliable HVP here: "
                        f"use float32 (or float64) parameters and compute")
    return message


@dataclass(frozen=True)
class HVPErrorStudy:
    """The FD HVP's relative error against eps along one probe (the U shape of Theorem 3.1).

    ``rel_error_exact``: against the double-backward HVP (nan where it cannot run: sharded or flash models).
    ``rel_error_stable``: against the FD HVP at ``stable_eps``, the smaller step of the adjacent pair of grid
    steps whose HVPs agree best; this reference needs no double backward, so it exists at any scale.
    ``predicted``: Theorem 3.1's bound eps^2 |D3|/6 + c/eps over |Hv| (central scheme), or the forward rule's
    eps |D3|/2 + 2c/eps (forward scheme; nan for richardson), with c the calibration's round-off coefficient
    (eps_mach |g|, or measured under mixed precision).
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
    scheme: str = "central"

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["auto"] = self.auto.as_dict()
        return out


def hvp_error_study(op: FiniteDifferenceHVP, v: Sequence[Tensor], *, eps_values: Sequence[float],
                    compute_dtype: torch.dtype | None = None,
                    reference_model: torch.nn.Module | None = None) -> HVPErrorStudy:
    """Run ``op`` along the unit probe v at every eps and at the ``auto`` eps. Keeps one HVP per eps in memory
    (local shards), so it is a diagnostic for models whose shards fit that many times; costs len(eps) + ~6 HVPs.

    ``compute_dtype``: as in ``calibrate_eps``. ``reference_model``: an unsharded copy of the model (e.g. in
    float64) whose double-backward HVP is the exact reference; by default ``op.model``'s own."""
    from .hvp import ExactHVPUnavailable, exact_hvp

    eps_values = sorted(float(e) for e in eps_values)
    if len(eps_values) < 2 or eps_values[0] <= 0:
        raise ValueError(f"need at least two positive eps values, got {eps_values}")
    calibrated = calibrate(op, v, compute_dtype=compute_dtype)
    auto = calibrated.choice
    try:
        if reference_model is None:
            exact, reason = exact_hvp(op.model, op.batches, v=v), None
        else:
            ref_dtype = next(reference_model.parameters()).dtype
            exact, reason = exact_hvp(reference_model, op.batches, v=[t.to(ref_dtype) for t in v]), None
    except ExactHVPUnavailable as e:
        exact, reason = None, str(e)
    except torch.OutOfMemoryError:  # double backward needs ~2x a gradient's memory; the FD study still runs
        exact, reason = None, "the exact (double-backward) HVP ran out of memory"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fd = [op.with_eps(eps).matvec(v) for eps in eps_values]
    at_auto = calibrated.hvp if calibrated.hvp is not None else op.with_eps(auto.eps).matvec(v)  # a ladder step
    norms = [op.space.norm(h) for h in fd]  # each a pass and an all-reduce: computed once
    exact_norm = op.space.norm(exact) if exact is not None else float("nan")

    def rel(a: Sequence[Tensor], b: Sequence[Tensor], norm_b: float) -> float:
        return _distance(op, a, b) / norm_b if norm_b > 0 else float("nan")

    agreement = [rel(fd[k], fd[k + 1], norms[k + 1]) for k in range(len(fd) - 1)]
    finite = [k for k, a in enumerate(agreement) if math.isfinite(a) and norms[k] > 0]
    stable = min(finite, key=lambda k: agreement[k]) if finite else len(fd) - 1
    reference_norm = exact_norm if exact is not None else norms[stable]
    measured = (math.isfinite(auto.third_derivative) and auto.third_derivative > 0
                and op.scheme in ("central", "forward"))
    nan = float("nan")
    return HVPErrorStudy(
        eps=eps_values,
        rel_error_exact=[rel(h, exact, exact_norm) if exact is not None else nan for h in fd],
        rel_error_stable=[rel(h, fd[stable], norms[stable]) for h in fd],
        predicted=[error_model(e, roundoff=auto.roundoff, third_derivative=auto.third_derivative,
                               scheme=op.scheme) / reference_norm
                   if measured else nan for e in eps_values],
        perturbation_rounding=[op.perturbation_rounding(v, e) for e in eps_values],
        stable_eps=eps_values[stable],
        auto=auto,
        auto_rel_error_exact=rel(at_auto, exact, exact_norm) if exact is not None else nan,
        auto_rel_error_stable=rel(at_auto, fd[stable], norms[stable]),
        exact_unavailable=reason,
        scheme=op.scheme,
    )
