"""``eigenpairs``: the top-k (or bottom-k, or largest-magnitude) eigenpairs of the analysis loss's Hessian at the
model's current parameters, by thick-restart Lanczos (hessian_core.eigen) over FD HVPs. Like ``analyze`` it
leaves the model exactly as it found it (``preserved_state``) and works on plain or FSDP2-sharded models, every
rank calling it together with its own batches."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .api import ParamFilter, _checked_eps, _choose_eps, _space, preserved_state
from .eigen import EigenResult, EigenState, thick_restart_lanczos
from .hvp import FiniteDifferenceHVP
from .loss import Batch, LossFn, evaluate_loss


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
    the FD HVP's Weyl bound to the residual, from the eps calibration's error estimate (none for a fixed eps
    unless ``assess_eps``).
    """
    eps = _checked_eps(eps)
    started = time.perf_counter()
    with preserved_state(model):
        space = _space(model, param_filter)
        dtype = vector_dtype or (torch.float64 if space.dtype == torch.float64 else torch.float32)
        op = FiniteDifferenceHVP(model, batches, eps=1.0 if eps == "auto" else float(eps), scheme=scheme,
                                 space=space, loss_fn=loss_fn)
        choice = _choose_eps(op, eps, seed=seed, assess=assess_eps)
        op = op.with_eps(choice.eps) if choice is not None else op
        loss = evaluate_loss(model, op.batches, space=space, loss=op.loss)
        result = thick_restart_lanczos(op.matvec, space=space, k=k, which=which, tol=tol, max_hvps=max_hvps,
                                       basis=basis, vector_dtype=dtype, seed=seed, state=state,
                                       on_restart=on_restart)
    return dataclasses.replace(result, hvp_relative_error=None if choice is None else choice.relative_error,
                               eps=op.eps, eps_choice=choice, loss=loss, hvp_count=op.calls,
                               seconds=time.perf_counter() - started)
