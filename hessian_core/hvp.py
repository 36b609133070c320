"""Hessian-vector product operators over plain or FSDP2-sharded parameters.

``FiniteDifferenceHVP`` computes Hv from ordinary gradient passes at parameters perturbed in place, shard by
shard, so nothing is gathered beyond FSDP's own forward/backward. Its schemes: ``central`` (2 passes an HVP,
O(eps^2)), ``richardson`` (4 passes, O(eps^4)) and ``forward`` (1 pass, O(eps): the gradient at theta is
computed once and kept, ``FiniteDifferenceHVP._base_gradient``). ``exact_hvp`` is the double-backward
reference for unsharded models, used by tests and by step-size calibration.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .loss import AnalysisLoss, Batch, LossFn, accumulate_gradient
from .vectors import FlatVector, ParamSpace, Vector, local_view

# (gradient coefficient, step in units of eps) and the divisor in units of eps for each scheme.
STENCILS: dict[str, tuple[tuple[tuple[float, float], ...], float]] = {
    "central": (((1.0, 1.0), (-1.0, -1.0)), 2.0),
    # Richardson extrapolation of two central differences: cancels the eps^2 term, O(eps^4) error.
    "richardson": (((-1.0, 2.0), (8.0, 1.0), (-8.0, -1.0), (1.0, -2.0)), 12.0),
    # (grad L(theta + eps v) - grad L(theta)) / eps, O(eps) error: the step-0 gradient is computed once per
    # parameter state and kept, so an HVP costs one gradient pass (``FiniteDifferenceHVP._passes_forward``).
    "forward": (((1.0, 1.0), (-1.0, 0.0)), 1.0),
}


def rounding_gain(scheme: str) -> float:
    """sum |c_k| / divisor of the scheme's stencil: one HVP's round-off is this x eps_mach |grad L| / eps
    (central 1, richardson 1.5, forward 2: two gradients' rounding over eps instead of 2 eps)."""
    stencil, divisor = STENCILS[scheme]
    return sum(abs(c) for c, _ in stencil) / divisor


class ExactHVPUnavailable(RuntimeError):
    """The exact (double-backward) HVP cannot run for this model; the message says why."""


def _check_step(eps: float, scheme: str) -> None:
    if scheme not in STENCILS:
        raise ValueError(f"hvp scheme {scheme!r}: expected one of {sorted(STENCILS)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are differenced in at least float32: a bfloat16 difference would lose the signal."""
    return torch.promote_types(dtype, torch.float32)


RESTORE_PLACES = ("device", "host")


def _copy_back(params: Vector, backup: Vector) -> None:
    """The parameters set to their retained copy, wherever it is (a host copy is read on the compute stream)."""
    if backup and backup[0].device == params[0].device:
        torch._foreach_copy_(params, backup)
    else:
        for p, saved in zip(params, backup):
            p.copy_(saved, non_blocking=True)


class _Shared:
    """What the copies of one operator share: the parameter backup buffer, the HVP and gradient-pass counts,
    and the forward scheme's gradient at theta (``base``, None until needed) with the parameter state it was
    computed at (``base_key``, see ``FiniteDifferenceHVP._param_key``)."""

    def __init__(self):
        self.backup: Vector | None = None
        self.calls = 0
        self.gradient_passes = 0
        self.base: FlatVector | None = None
        self.base_key: tuple | None = None


class FiniteDifferenceHVP:
    """Hv ~ (grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps), the 4-point Richardson scheme, or the
    forward difference (grad L(theta + eps v) - grad L(theta)) / eps.

    Both passes see the same batches; the parameters are restored bit-exactly from one retained copy of the
    local shards, kept on the device or (``restore="host"``) in one host buffer, pinned where the device is a GPU,
    whose copies to and from the device run on the compute stream (ordered with the passes, no sync); the result
    is a list of local shards like the parameters, in ``accumulator_dtype``.
    Entries of ``v`` may be ``None`` for parameters where v is zero (block masks).

    The operator is immutable: ``with_eps`` / ``with_scheme`` return copies that share the model, the loss
    and the backup buffer (and the ``calls`` count), so a different step costs no new allocation. L is the
    analysis loss of ``hessian_core.loss`` (token mean of the whole set, or the mean of ``loss_fn``).
    Building it on a sharded model is a collective call (the global token count).

    The forward scheme keeps grad L(theta) in one more gradient-sized buffer (local shards, accumulator dtype),
    shared by the copies (it does not depend on eps) and computed on first use. It is keyed by the parameters'
    state: every parameter's autograd version counter and its local shard's address, recorded after each HVP's
    restore (``_param_key``). An in-place change of the parameters by anyone else (an optimizer step,
    ``load_state_dict``; on plain tensors also another operator's perturb-and-restore) bumps a version, and the
    next HVP recomputes the gradient (one more pass) instead of differencing against a stale one; writes that the
    key cannot see (through FSDP2's local shards) call ``forget_gradient``. ``gradient_passes`` counts every
    gradient pass the operator ran.
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch], *, eps: float, scheme: str = "central",
                 space: ParamSpace | None = None, loss_fn: LossFn | None = None, restore: str = "device"):
        _check_step(eps, scheme)
        if restore not in RESTORE_PLACES:
            raise ValueError(f"restore {restore!r}: expected one of {RESTORE_PLACES}")
        self._restore = restore
        if model.training:
            raise ValueError("the model must be in eval mode (dropout off) for finite-difference HVPs")
        self._model = model
        self._batches = tuple(batches)
        self._eps = float(eps)
        self._scheme = scheme
        self._space = space or ParamSpace(model)
        self._loss = AnalysisLoss(self._batches, loss_fn=loss_fn, space=self._space)
        self._shared = _Shared()

    model = property(lambda self: self._model)
    batches = property(lambda self: self._batches)
    eps = property(lambda self: self._eps)
    scheme = property(lambda self: self._scheme)
    space = property(lambda self: self._space)
    loss = property(lambda self: self._loss)
    calls = property(lambda self: self._shared.calls)
    gradient_passes = property(lambda self: self._shared.gradient_passes)
    restore = property(lambda self: self._restore)
    out_dtype = property(lambda self: accumulator_dtype(self._space.dtype))

    def with_eps(self, eps: float) -> FiniteDifferenceHVP:
        """The same operator at step ``eps``."""
        _check_step(eps, self._scheme)
        other = copy.copy(self)
        other._eps = float(eps)
        return other

    def with_scheme(self, scheme: str) -> FiniteDifferenceHVP:
        """The same operator with another difference scheme (``central``, ``richardson`` or ``forward``)."""
        _check_step(self._eps, scheme)
        other = copy.copy(self)
        other._scheme = scheme
        return other

    def _save(self, params: Vector) -> Vector:
        if self._restore == "host":
            return self._save_on_host(params)
        if self._shared.backup is None:
            self._shared.backup = [t.clone() for t in params]
        else:
            torch._foreach_copy_(self._shared.backup, params)
        return self._shared.backup

    def _save_on_host(self, params: Vector) -> Vector:
        """The parameters' exact copy in one host buffer (views per parameter), allocated once."""
        gpu = self.space.device.type == "cuda"
        if self._shared.backup is None:
            flat = torch.empty(sum(p.numel() for p in params), dtype=self.space.dtype, pin_memory=gpu)
            self._shared.backup = list(FlatVector(flat, [p.shape for p in params]))
        for saved, p in zip(self._shared.backup, params):
            saved.copy_(p, non_blocking=gpu)
        return self._shared.backup

    @torch.no_grad()
    def _set_params(self, params: Vector, backup: Vector, v: Sequence[Tensor | None], step: float, *,
                    at_backup: bool) -> None:
        if not at_backup:
            _copy_back(params, backup)
        idx = [i for i, t in enumerate(v) if t is not None]
        if idx and step != 0.0:
            torch._foreach_add_([params[i] for i in idx], [v[i].to(params[i].dtype) for i in idx], alpha=step)

    def gradient_norm(self) -> float:
        """|grad L| at theta from one gradient pass, read off the ``.grad`` buffers (no copy of the gradient);
        under the forward scheme from its kept gradient at theta (computed here if it is not current, and then
        kept for the HVPs)."""
        if self.scheme == "forward":
            return self.space.norm(self._base_gradient(self.space.local_params()))
        self._accumulate()
        try:
            return self.space.norm(self.space.local_grads())
        finally:
            self.model.zero_grad(set_to_none=True)

    def _accumulate(self, **kwargs) -> Tensor:
        """One gradient pass of the analysis loss (``accumulate_gradient``), counted."""
        self._shared.gradient_passes += 1
        return accumulate_gradient(self.model, self.batches, loss=self.loss, **kwargs)

    def _param_key(self) -> tuple:
        """The parameters' state as autograd sees it: each parameter's version counter, which an in-place write
        bumps (through the parameter, or for plain tensors through any ``.detach()`` view of it), and its local
        shard's address (a replaced shard has another). A DTensor's counter is its own: writes through a
        ``to_local()`` view of its shard do not bump it (nor the shard's, whose views each get a fresh counter),
        so on FSDP2 only DTensor-level writes (an optimizer step, ``copy_``, ``load_state_dict``) are seen. Code
        that writes the local shards without restoring them calls ``forget_gradient``."""
        return tuple((p._version, local_view(p.detach()).data_ptr()) for p in self.space.params)

    def forget_gradient(self) -> None:
        """Drop the forward scheme's kept gradient at theta (it is recomputed by the next HVP): for callers that
        change the parameters in a way ``_param_key`` cannot see (in place through FSDP2's local shards)."""
        self._shared.base_key = None

    def _base_gradient(self, params: Vector) -> FlatVector:
        """grad L(theta) for the forward scheme, in ``out_dtype``: the kept one while the parameters have not
        changed since it was computed (or since the last HVP restored them), else one gradient pass into the
        kept buffer (allocated once; in place as ``.grad`` when the dtypes agree, as the HVP's passes are)."""
        shared = self._shared
        if shared.base is not None and shared.base_key is not None and shared.base_key == self._param_key():
            return shared.base
        if shared.base is None:
            shared.base = FlatVector(torch.empty(self.space.local_numel, dtype=self.out_dtype,
                                                 device=self.space.device), [p.shape for p in params])
        base = shared.base
        shared.base_key = None  # not valid until the pass below completes
        try:
            if self.space.dtype == self.out_dtype:
                base.flat.zero_()
                self.space.attach_grads(base)
                self._accumulate(into_existing=True)
                self._check_in_place(base)
            else:
                self._accumulate()
                with torch.no_grad():
                    torch._foreach_copy_(list(base), self.space.local_grads())
        finally:
            self.model.zero_grad(set_to_none=True)
        shared.base_key = self._param_key()
        return base

    def matvec(self, v: Sequence[Tensor | None]) -> Vector:
        params = self.space.local_params()
        if len(v) != len(params):
            raise ValueError(f"vector has {len(v)} tensors, the model has {len(params)} parameters")
        forward = self.scheme == "forward"
        base = self._base_gradient(params) if forward else None  # before the parameters move
        with torch.no_grad():
            backup = self._save(params)
        out = FlatVector(torch.empty(self.space.local_numel, dtype=self.out_dtype, device=self.space.device),
                         [p.shape for p in params])
        if forward:
            passes = functools.partial(self._passes_forward, base=base)
        else:
            passes = self._passes_in_place if self.space.dtype == self.out_dtype else self._passes_copied
        try:
            scale = passes(out, params, backup, v)
        finally:
            with torch.no_grad():
                _copy_back(params, backup)
            if forward:  # restored bit-exactly: the kept gradient is still the one at these parameters
                self._shared.base_key = self._param_key()
            self.model.zero_grad(set_to_none=True)
        out.flat.mul_(scale)
        self._shared.calls += 1
        return out

    __call__ = matvec

    def _passes_in_place(self, out: FlatVector, params: Vector, backup: Vector, v: Sequence[Tensor | None]) -> float:
        """The stencil's gradient passes accumulated straight into ``out``, which every pass's backward uses as
        ``.grad``: pass k backpropagates (c_k / c_0) x the loss, so ``out`` ends as sum_k (c_k / c_0) grad L(theta
        + s_k eps v) with no gradient-sized buffer beside it. Returns the factor that turns ``out`` into Hv.
        Negating a loss negates its gradient exactly, but the sum's order differs from differencing two whole
        gradients (batch by batch instead of gradient by gradient): in float64 it agrees to rounding, not bits."""
        stencil, divisor = STENCILS[self.scheme]
        first = stencil[0][0]
        out.flat.zero_()
        self.space.attach_grads(out)
        for k, (coeff, step) in enumerate(stencil):
            self._set_params(params, backup, v, step * self.eps, at_backup=k == 0)
            self._accumulate(weight=coeff / first, into_existing=True)
        self._check_in_place(out)
        return first / (divisor * self.eps)

    def _check_in_place(self, out: FlatVector) -> None:
        for name, p, mine in zip(self.space.names, self.space.params, out):
            if mine.numel() and (p.grad is None or local_view(p.grad).data_ptr() != mine.data_ptr()):
                raise RuntimeError(f"parameter {name}: its gradient was not accumulated in place into the HVP buffer")

    def _passes_forward(self, out: FlatVector, params: Vector, backup: Vector, v: Sequence[Tensor | None], *,
                        base: FlatVector) -> float:
        """The forward scheme's one pass, at theta + eps v, into ``out`` (in place as ``.grad`` when the dtypes
        agree, else added after the pass), minus the kept gradient at theta. Returns 1 / eps."""
        self._set_params(params, backup, v, self.eps, at_backup=True)
        if self.space.dtype == self.out_dtype:
            out.flat.zero_()
            self.space.attach_grads(out)
            self._accumulate(into_existing=True)
            self._check_in_place(out)
        else:
            self._accumulate()
            with torch.no_grad():
                torch._foreach_copy_(list(out), self.space.local_grads())
        out.flat.sub_(base.flat)
        return 1.0 / self.eps

    def _passes_copied(self, out: FlatVector, params: Vector, backup: Vector, v: Sequence[Tensor | None]) -> float:
        """The stencil's passes with each gradient added into ``out`` after its pass, for gradients in a lower
        precision than ``out`` (bfloat16 parameters: the difference is taken in float32, where it keeps its
        signal). Returns the factor that turns ``out`` into Hv."""
        stencil, divisor = STENCILS[self.scheme]
        first = stencil[0][0]
        for k, (coeff, step) in enumerate(stencil):
            self._set_params(params, backup, v, step * self.eps, at_backup=k == 0)
            self._accumulate()
            grads = self.space.local_grads()
            with torch.no_grad():
                if k == 0:
                    torch._foreach_copy_(out, grads)
                else:  # mixed dtypes (bf16 grads into a float32 sum) need no converted copy of the gradient
                    torch._foreach_add_(out, grads, alpha=coeff / first)
        return first / (divisor * self.eps)

    def gradient(self) -> tuple[float, Vector]:
        """The analysis loss (this rank's share) and a copy of the gradient's local shards."""
        loss = self._accumulate()
        grads = [g.detach().to(self.out_dtype, copy=True) for g in self.space.local_grads()]
        self.model.zero_grad(set_to_none=True)
        return float(loss), grads

    @torch.no_grad()
    def perturbation_rounding(self, v: Sequence[Tensor], eps: float) -> float:
        """|round(theta + eps v) - theta - eps v| / |eps v|: how much of the step the parameter dtype loses."""
        params = self.space.local_params()
        err = []
        exact = []
        for p, t in zip(params, v):
            step = t.to(torch.float64) * eps
            applied = (p + t.to(p.dtype) * eps).to(torch.float64) - p.to(torch.float64)
            err.append(applied - step)
            exact.append(step)
        sums = self.space.dots([(err, err), (exact, exact)])
        return float((sums[0] / sums[1]).sqrt()) if sums[1] > 0 else 0.0


def exact_hvp(model: torch.nn.Module, batches: Sequence[Batch], *, v: Sequence[Tensor],
              loss_fn: LossFn | None = None) -> Vector:
    """Hv of the analysis loss by double backward through the math SDPA kernel, for unsharded models only."""
    space = ParamSpace(model)
    if space.sharded:
        raise ExactHVPUnavailable("the exact HVP needs an unsharded model (double backward through FSDP2 is not supported); "
                                  "use the finite-difference HVP")
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in (None, "eager", "sdpa"):
        raise ExactHVPUnavailable(f"the exact HVP cannot run with attn_implementation={attn!r} (no double backward); "
                                  "load the model with attn_implementation='sdpa' or 'eager'")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss = AnalysisLoss(batches, loss_fn=loss_fn)
    out = [torch.zeros_like(p, dtype=accumulator_dtype(p.dtype)) for p in space.params]
    with sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            grads = torch.autograd.grad(loss.term(model, batch), space.params, create_graph=True)
            dot = sum((g * t.to(g.dtype)).sum() for g, t in zip(grads, v))
            hv = torch.autograd.grad(dot, space.params)
            torch._foreach_add_(out, [h.to(o.dtype) for h, o in zip(hv, out)])
    return out
