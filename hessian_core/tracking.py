"""``track_lambda_max``: the Hessian's largest eigenvalue during training, warm-started from the previous call's top
Ritz vector, stopping as soon as that Ritz pair's residual meets a tolerance.

Edge-of-stability work watches lambda_max every few optimizer steps. Between two nearby steps the top eigenvector
moves little, so a Lanczos run started from the previous one converges in a few HVPs where a cold run from a random
probe needs tens. The state a call returns (``TrackerState``) is small: the top Ritz vector as this rank's flat
shard (one vector of the parameters' local size, the same layout under FSDP2 as on one process), the eps and the
figures of the last call. The solver is the thick-restart Lanczos of ``hessian_core.eigen`` with k = 1 and a small
basis; unlike ``thick_restart_lanczos``, which checks convergence only at a restart, it checks the top Ritz pair's
residual |c . s| (no HVP) after every step, so a warm start costs as few HVPs as the tolerance allows.
Like ``analyze`` it leaves the model exactly as it found it (``preserved_state``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .api import ParamFilter, _checked_eps, _space, calibrated_operator, preserved_state
from .eigen import eigen_restart, eigen_start, eigen_step
from .loss import Batch, LossFn
from .vectors import FlatVector, ParamSpace, probe_vector


@dataclass(kw_only=True)
class TrackerState:
    """What the next ``track_lambda_max`` call starts from. ``vector``: this rank's flat shard of the last top
    Ritz vector (unit norm over all ranks), in ``ParamSpace`` order of ``param_names``; ``eps``: the FD step the
    calls use (chosen once, by the first call, for ``eps="auto"``); ``lambda_max``, ``residual``, ``hvps``: the
    last call's figures; ``calls``: how many calls this state has seen."""

    vector: Tensor
    param_names: list[str]
    eps: float
    lambda_max: float = math.nan
    residual: float = math.nan
    hvps: int = 0
    calls: int = 0
    history: list[dict] = field(default_factory=list)  # one dict of the figures per call, oldest first


@dataclass(frozen=True, kw_only=True)
class TrackResult:
    """One call's lambda_max, its residual |H u - lambda u| (of the FD operator), whether it met ``tol`` (else
    ``max_hvps`` stopped it), the solver's HVPs (``hvps``) and all of them with the eps choice (``hvp_count``),
    the analysis loss, the eps, the seconds, and the state for the next call."""

    lambda_max: float
    residual: float
    converged: bool
    hvps: int
    hvp_count: int
    loss: float
    eps: float
    warm: bool
    seconds: float
    state: TrackerState = field(repr=False)

    def summary(self) -> dict:
        return {"lambda_max": self.lambda_max, "lambda_max_residual": self.residual, "converged": self.converged,
                "hvps": self.hvps, "hvp_count": self.hvp_count, "loss": self.loss, "eps": self.eps,
                "warm": self.warm, "seconds": self.seconds}


def _top_residual(state) -> tuple[float, float]:
    """(top Ritz value, its residual |c . s|) of the current basis: a small eigenproblem on the host, no HVP."""
    j = state.size
    t = state.projected[:j, :j]
    theta, s = torch.linalg.eigh((t + t.T) / 2)
    return float(theta[-1]), abs(float(state.projected[j, :j] @ s[:, -1]))


def _start_vector(space: ParamSpace, state: TrackerState | None, *, seed: int, dtype: torch.dtype) -> list[Tensor]:
    if state is None:
        return probe_vector(space, seed=seed, probe_index=0, kind="gaussian", dtype=dtype)
    if list(state.param_names) != list(space.names) or state.vector.numel() != space.local_numel:
        raise ValueError(f"the tracker state is of {len(state.param_names)} parameters ({state.vector.numel()} local "
                         f"elements), this model has {len(space.names)} ({space.local_numel}): pass state=None")
    return FlatVector(state.vector.to(device=space.device, dtype=dtype), [t.shape for t in space.local_params()])


def track_lambda_max(model: nn.Module, batches: Sequence[Batch | Mapping[str, torch.Tensor]],
                     state: TrackerState | None = None, *, tol: float = 1e-3, max_hvps: int = 100, basis: int = 8,
                     eps: float | str = "auto", scheme: str = "central", loss_fn: LossFn | None = None,
                     param_filter: ParamFilter | None = None, seed: int = 0,
                     vector_dtype: torch.dtype | None = None) -> TrackResult:
    """lambda_max of the analysis loss's Hessian at the model's current parameters, warm-started from ``state``
    (the previous call's ``result.state``; None: a cold start from a Gaussian probe, a pure function of ``seed``).

    Stops when the top Ritz pair's residual |H u - theta u| is at most ``tol`` x |theta| (then lambda_max is
    within that residual of an eigenvalue of the FD operator, and usually far closer: the error goes as the
    residual squared over the gap), or after ``max_hvps`` HVPs. ``basis``: Lanczos vectors held (>= 3); a full
    basis restarts thickly keeping the best Ritz vectors. eps: a fixed FD step, or ``"auto"``: chosen by the
    first call (``hessian_core.eps``, ~1 gradient + 2-6 HVPs) and kept in the state for the later calls.
    model, batches, scheme, loss_fn, param_filter, vector_dtype: as for ``analyze``; under FSDP2 every rank calls
    it together, and the state's vector is this rank's shard.
    """
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if max_hvps < 1 or basis < 3:
        raise ValueError(f"max_hvps must be >= 1 and basis >= 3, got max_hvps={max_hvps}, basis={basis}")
    eps = _checked_eps(eps if state is None else state.eps)
    started = time.perf_counter()
    with preserved_state(model):
        space = _space(model, param_filter)
        dtype = vector_dtype or (torch.float64 if space.dtype == torch.float64 else torch.float32)
        op, _, loss = calibrated_operator(model, batches, space=space, eps=eps, scheme=scheme, loss_fn=loss_fn,
                                          seed=seed, assess=False)
        before = op.calls
        lanczos = eigen_start(_start_vector(space, state, seed=seed, dtype=dtype), space=space, k=1, which="LA",
                              tol=tol, basis=min(basis, space.numel), vector_dtype=dtype, seed=seed)
        converged = False
        while lanczos.hvps < max_hvps and not lanczos.stopped:
            eigen_step(lanczos, op.matvec, space=space)
            theta, residual = _top_residual(lanczos)
            converged = residual <= tol * abs(theta)
            if converged or lanczos.hvps >= max_hvps or lanczos.size >= lanczos.basis or lanczos.stopped:
                eigen_restart(lanczos, final=converged or lanczos.hvps >= max_hvps)
                if converged:
                    break
        # after the last restart rows[0] is the top Ritz vector and projected[0, 0] its value
        value = float(lanczos.projected[0, 0])
        residual = abs(float(lanczos.projected[lanczos.size, 0]))
        vector = lanczos.rows[0].clone()
        hvps = op.calls - before
    new = TrackerState(vector=vector, param_names=list(space.names), eps=op.eps, lambda_max=value, residual=residual,
                       hvps=hvps, calls=(state.calls if state else 0) + 1,
                       history=[*(state.history if state else []), {"lambda_max": value, "residual": residual,
                                                                    "hvps": hvps, "warm": state is not None}])
    return TrackResult(lambda_max=value, residual=residual, converged=residual <= tol * abs(value), hvps=hvps,
                       hvp_count=op.calls, loss=loss, eps=op.eps, warm=state is not None,
                       seconds=time.perf_counter() - started, state=new)
