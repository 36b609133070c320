"""The Lanczos iteration over any symmetric operator on a ParamSpace, resumable one step at a time.

Vectors are stored in a chosen dtype; every scalar is float64. Per step: one matvec, one all-reduce for
alpha, one batched all-reduce for the reorthogonalization coefficients (when enabled) and one for beta,
so at most 3 <= 2 + r scalar all-reduces. Only the vectors reorthogonalization needs are kept: the last two
for ``none``, the last ``window`` for ``window``, all of them for ``full``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .vectors import ParamSpace, Vector, axpy_, cast

REORTH_MODES = ("none", "window", "full")


@dataclass
class LanczosState:
    """Everything needed to take the next step (and what a checkpoint saves)."""

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    basis: list[Vector] = field(default_factory=list)  # most recent last; basis[-1] is the current q
    stopped: str | None = None  # "invariant subspace" once the Krylov space is exhausted

    @property
    def steps_done(self) -> int:
        return len(self.alphas)


@dataclass(frozen=True)
class LanczosResult:
    alphas: Tensor  # float64 [m]: T[j, j]
    betas: Tensor  # float64 [m]: T[j, j+1]; the last one is the final residual norm
    stopped: str

    @property
    def steps(self) -> int:
        return int(self.alphas.numel())


def _check_options(reorth: str, window: int) -> None:
    if reorth not in REORTH_MODES:
        raise ValueError(f"reorth {reorth!r}: expected one of {REORTH_MODES}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")


def _kept_vectors(reorth: str, window: int) -> int | None:
    """How many recent Lanczos vectors to keep (None: all)."""
    if reorth == "full":
        return None
    if reorth == "window":
        return max(window, 2)
    return 2


def lanczos_start(v0: Sequence[Tensor], *, space: ParamSpace, vector_dtype: torch.dtype) -> LanczosState:
    norm = space.norm(v0)
    if not norm > 0:
        raise ValueError("the Lanczos start vector is zero")
    q = [t.to(vector_dtype) / norm if t.dtype != vector_dtype else t / norm for t in v0]
    return LanczosState(basis=[q])


def lanczos_step(state: LanczosState, matvec: Callable[[Vector], Vector], *, space: ParamSpace,
                 reorth: str = "window", window: int = 8, tol: float = 1e-10) -> None:
    """Advance the recurrence by one step: beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}."""
    _check_options(reorth, window)
    if state.stopped:
        raise RuntimeError(f"Lanczos already stopped ({state.stopped})")
    q = state.basis[-1]
    w = matvec(q)
    alpha = float(space.dots([(w, q)])[0])
    _check_finite("alpha", alpha, state.steps_done)
    axpy_(w, q, alpha=-alpha)
    if state.betas:
        axpy_(w, state.basis[-2], alpha=-state.betas[-1])
    if reorth != "none":
        against = state.basis if reorth == "full" else state.basis[-window:] if window > 0 else []
        if against:
            coeffs = space.dots([(w, b) for b in against])
            for c, b in zip(coeffs.tolist(), against):
                axpy_(w, b, alpha=-c)
    beta = space.norm(w)
    _check_finite("beta", beta, state.steps_done)
    state.alphas.append(alpha)
    state.betas.append(beta)
    scale = max(max(abs(a) for a in state.alphas), max(state.betas[:-1], default=0.0))
    if beta <= tol * scale or beta == 0.0:
        state.stopped = "invariant subspace"
        return
    vector_dtype = q[0].dtype
    next_q = cast([t / beta for t in w], vector_dtype)
    state.basis.append(next_q)
    keep = _kept_vectors(reorth, window)
    if keep is not None and len(state.basis) > keep:
        del state.basis[: len(state.basis) - keep]


def _check_finite(name: str, value: float, step: int) -> None:
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"Lanczos step {step}: {name} is {value} (non-finite HVP or loss)")


def lanczos(matvec: Callable[[Vector], Vector], v0: Sequence[Tensor] | None, *, space: ParamSpace, steps: int,
            reorth: str = "window", window: int = 8, vector_dtype: torch.dtype = torch.float32, tol: float = 1e-10,
            state: LanczosState | None = None,
            on_step: Callable[[LanczosState], None] | None = None) -> LanczosResult:
    """Run ``steps`` Lanczos steps from v0, or continue ``state`` (then v0 may be None) up to ``steps`` in all;
    stops early at an invariant subspace."""
    _check_options(reorth, window)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if state is None:
        if v0 is None:
            raise ValueError("lanczos needs a start vector v0 or a state to continue")
        state = lanczos_start(v0, space=space, vector_dtype=vector_dtype)
    while state.steps_done < steps and not state.stopped:
        lanczos_step(state, matvec, space=space, reorth=reorth, window=window, tol=tol)
        if on_step is not None:
            on_step(state)
    return LanczosResult(torch.tensor(state.alphas, dtype=torch.float64),
                         torch.tensor(state.betas, dtype=torch.float64), state.stopped or "steps")
