"""``eigenpairs``: the top-k (or bottom-k, or largest-magnitude) eigenpairs of the analysis loss's Hessian at the
model's current parameters, by thick-restart Lanczos (hessian_core.eigen) over FD HVPs. Like ``analyze`` it
leaves the model exactly as it found it (``preserved_state``) and works on plain or FSDP2-sharded models, every
rank calling it together with its own batches. ``with_fd_bars`` gives each eigenvalue its own FD error bar (the
Rayleigh quotients of its eigenvector at eps and 2 eps: 2 HVPs a pair), for any FD operator (the pipeline's
ranks call it on theirs)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .api import ParamFilter, _checked_eps, _space, calibrated_operator, preserved_state
from .eigen import EigenResult, EigenState, thick_restart_lanczos
from .hvp import FiniteDifferenceHVP
from .loss import Batch, LossFn


def fd_rayleigh_quotients(op: FiniteDifferenceHVP, result: EigenResult) -> tuple[np.ndarray, np.ndarray]:
    """(<u_i, H_eps u_i>, <u_i, H_2eps u_i>) for each eigenvector u_i of ``result`` with the FD operator ``op``
    at its eps and at twice it: 2k HVPs, one all-reduce of a scalar each (every rank calls it together)."""
    space = result.space or op.space
    twice = op.with_eps(2.0 * op.eps)  # a copy sharing op's buffers
    at_eps, at_twice = [], []
    for u in result.eigenvectors:
        at_eps.append(space.dot(u, op.matvec(u)))
        at_twice.append(space.dot(u, twice.matvec(u)))
    return np.array(at_eps, dtype=np.float64), np.array(at_twice, dtype=np.float64)


def roundoff_coefficient(grad_norm: float, compute_dtype: torch.dtype) -> float:
    """c of one central FD HVP's round-off c / eps: eps_mach of the compute dtype times |grad L| (what the eps
    calibration uses where it does not measure c; hessian_core.eps)."""
    return float(torch.finfo(compute_dtype).eps) * grad_norm


def with_fd_bars(result: EigenResult, op: FiniteDifferenceHVP, *, roundoff: float | None) -> EigenResult:
    """``result`` with each eigenvalue's FD bar measured along its eigenvector (``fd_rayleigh_quotients``; the
    bar is ``hessian_core.error_bars.rayleigh_fd_bound``): 2k HVPs of ``op``, the operator the solver used.
    ``roundoff``: c of one HVP's round-off c / eps (the calibration's ``EpsChoice.roundoff``, or
    ``roundoff_coefficient``)."""
    at_eps, at_twice = fd_rayleigh_quotients(op, result)
    return dataclasses.replace(result, rayleigh_eps=at_eps, rayleigh_2eps=at_twice, roundoff=roundoff,
                               scheme=op.scheme, eps=op.eps)


def eigenpairs(model: nn.Module, batches: Sequence[Batch | Mapping[str, torch.Tensor]], *, k: int = 5,
               which: str = "LA", tol: float = 1e-4, max_hvps: int = 1000, eps: float | str = "auto",
               scheme: str = "central", param_filter: ParamFilter | None = None, loss_fn: LossFn | None = None,
               seed: int = 0, basis: int | None = None, vector_dtype: torch.dtype | None = None,
               assess_eps: bool = False, state: EigenState | None = None,
               on_restart: Callable[[EigenState], None] | None = None) -> EigenResult:
    """The k eigenpairs of H selected by ``which`` (``LA`` largest, ``SA`` smallest, ``LM`` largest magnitude),
    each to residual |H u - lambda u| <= tol x |lambda_max| (estimated), or those that converged within
    ``max_hvps`` HVPs (``result.converged`` says which; ``result.stopped`` why it stopped).

    model, batches, loss_fn, eps, scheme, param_filter, seed, assess_eps: as for ``analyze`` (the same loss, the
    same eps choice: ``"auto"`` costs ~1 gradient + 2-6 HVPs, counted in ``hvp_count``, not in ``hvps``).
    basis: vectors the solver holds (default k + max(k, 10)); vector_dtype: their dtype (default float64 for
    float64 parameters, else float32). state / on_restart: resume a saved run, and a hook after each restart
    (``on_restart=lambda s: save_eigen_state(s, folder=...)``, with rank and world_size under FSDP2); a resumed
    run gives the same bits at the same world size, and the same pairs to rounding at another.
    The result's eigenvectors are local shards on ``result.space``; each eigenvalue's bar (``error_bars``) adds
    to its residual the FD HVP's error along its own eigenvector (``with_fd_bars``: 2k more HVPs, in
    ``hvp_count``; the round-off coefficient from the eps calibration, or from one more gradient for a fixed eps
    not assessed).
    """
    eps = _checked_eps(eps)
    started = time.perf_counter()
    with preserved_state(model):
        space = _space(model, param_filter)
        dtype = vector_dtype or (torch.float64 if space.dtype == torch.float64 else torch.float32)
        op, choice, loss = calibrated_operator(model, batches, space=space, eps=eps, scheme=scheme, loss_fn=loss_fn,
                                               seed=seed, assess=assess_eps)
        result = thick_restart_lanczos(op.matvec, space=space, k=k, which=which, tol=tol, max_hvps=max_hvps,
                                       basis=basis, vector_dtype=dtype, seed=seed, state=state,
                                       on_restart=on_restart)
        roundoff = choice.roundoff if choice is not None else math.nan
        if not math.isfinite(roundoff):
            roundoff = roundoff_coefficient(op.gradient_norm(), space.dtype)
        result = with_fd_bars(result, op, roundoff=roundoff)
    return dataclasses.replace(result, hvp_relative_error=None if choice is None else choice.relative_error,
                               eps=op.eps, eps_choice=choice, loss=loss, hvp_count=op.calls,
                               seconds=time.perf_counter() - started)
