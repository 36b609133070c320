"""The Gauss-Newton operator G = J^T H_out J of the analysis loss, shard-locally on plain or FSDP2 parameters.

J is the Jacobian of the logits with respect to the parameters and H_out the Hessian of the analysis loss with
respect to the logits: per counted token t, scale x (diag(p_t) - p_t p_t^T) with p_t the softmax at theta and
scale = world / (counted tokens of the whole set) as in ``AnalysisLoss``; positions the loss does not count get 0.
G is the Hessian without the term of the logits' own curvature; it is PSD for cross-entropy.

``GaussNewtonOperator`` computes G v per batch from
- J v: a central difference of the logits, (f(theta + eps v) - f(theta - eps v)) / (2 eps), two no-grad forwards
  at parameters perturbed in place, shard by shard, and restored bit-exactly from one retained copy, exactly as
  ``FiniteDifferenceHVP`` does (it lends its backup and perturbation code);
- H_out (J v): in token chunks, in place in the J v buffer, in ``accumulator_dtype``;
- J^T w: one forward at theta with grad and the backward of sum(logits * w), so FSDP2 reduces the gradient as
  it does a gradient pass's: its average over ranks with the ``world`` in scale gives the global G v.
``gauss_newton_extra_bytes`` is what it holds beyond the model's own forward and backward, for ``plan``.

``EmpiricalFisherOperator`` is F v = (1/n) sum_i g_i (g_i . v) over the n sequences of the whole set (all ranks)
that have a counted token, g_i the gradient of sequence i's token-mean cross-entropy: n gradient passes of one
sequence each (and n scalar all-reduces) per product, nothing stored between products.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from .hvp import RESTORE_PLACES, FiniteDifferenceHVP, _copy_back, accumulator_dtype
from .loss import IGNORE_INDEX, Batch, LossFn, as_batch, counted_tokens, shifted_labels, token_loss_sum
from .sharding import reshard
from .vectors import FlatVector, ParamSpace, Vector, local_view


DEFAULT_CHUNK_TOKENS = 256  # softmax rows at a time: at 1024 the chunk is as large as a short batch's J v buffer


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _check_chunk(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")


def counted_positions(batch: Batch) -> Tensor:
    """[batch, seq_len] bool: the positions whose next-token loss ``AnalysisLoss`` counts (never the last one)."""
    b = as_batch(batch)
    targets = shifted_labels(b) != IGNORE_INDEX
    return torch.cat([targets, torch.zeros_like(targets[:, :1])], dim=1)


def _logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


@torch.no_grad()
def output_hessian_(u: Tensor, logits: Tensor, weights: Tensor, *, chunk_tokens: int) -> Tensor:
    """u <- weights x (diag(p) - p p^T) u per token, in place, with p = softmax(logits) in u's dtype.

    ``u`` and ``logits`` are [tokens, vocab], ``weights`` [tokens] (0 for tokens the loss does not count). The
    softmax is taken ``chunk_tokens`` rows at a time, so beside u and the logits only one chunk x vocab buffer
    is alive; p.u goes through a batched matmul, which needs no product buffer."""
    for lo in range(0, u.shape[0], chunk_tokens):
        rows = slice(lo, min(lo + chunk_tokens, u.shape[0]))
        p = torch.softmax(logits[rows], dim=-1, dtype=u.dtype)
        uc = u[rows]
        pu = torch.bmm(p.unsqueeze(1), uc.unsqueeze(2)).squeeze(2)  # [chunk, 1]
        wc = weights[rows].unsqueeze(1)
        uc.sub_(pu).mul_(p).mul_(wc).masked_fill_(wc == 0, 0.0)  # a padded row's logits may be anything, even NaN
        del p
    return u


class GaussNewtonOperator:
    """G v = J^T H_out J v of the analysis loss (the token mean of next-token cross-entropy, masks, labels and
    -100 counted as ``AnalysisLoss`` counts them, over every batch and rank), with J v a central difference of
    the logits at step ``eps``.

    The surface is FiniteDifferenceHVP's: ``matvec(v)`` / ``__call__`` take local shards (entries may be ``None``
    for zero) and return a FlatVector of local shards in ``out_dtype`` (``accumulator_dtype``); ``with_eps``
    returns a copy sharing the model, the backup buffer and the ``calls`` count. Each product costs, per batch,
    two no-grad forwards and one forward and backward (about 1.5 gradient passes in all). Batches are processed
    one at a time; beyond the model's own passes the operator holds one batch's J v buffer, the logits at theta
    and one ``chunk_tokens`` x vocab softmax chunk (``gauss_newton_extra_bytes``). Building it on a sharded model
    is a collective call (the global token count).
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch], *, eps: float,
                 space: ParamSpace | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, restore: str = "device",
                 loss_fn: LossFn | None = None):
        if loss_fn is not None:
            raise ValueError("the Gauss-Newton operator takes no loss_fn: its split J^T H_out J needs the logits "
                             "of the default token-mean cross-entropy")
        _check_eps(eps)
        _check_chunk(chunk_tokens)
        if restore not in RESTORE_PLACES:
            raise ValueError(f"restore {restore!r}: expected one of {RESTORE_PLACES}")
        # the FD HVP's backup buffer, perturbation and restore code, and its AnalysisLoss (the token scale)
        self._fd = FiniteDifferenceHVP(model, batches, eps=eps, space=space, restore=restore)
        self._batches = [as_batch(b) for b in self._fd.batches]
        self._chunk_tokens = chunk_tokens

    model = property(lambda self: self._fd.model)
    batches = property(lambda self: self._fd.batches)
    eps = property(lambda self: self._fd.eps)
    space = property(lambda self: self._fd.space)
    loss = property(lambda self: self._fd.loss)
    calls = property(lambda self: self._fd.calls)
    restore = property(lambda self: self._fd.restore)
    chunk_tokens = property(lambda self: self._chunk_tokens)
    out_dtype = property(lambda self: accumulator_dtype(self._fd.space.dtype))

    def with_eps(self, eps: float) -> GaussNewtonOperator:
        """The same operator at step ``eps``."""
        _check_eps(eps)
        other = copy.copy(self)
        other._fd = self._fd.with_eps(eps)
        return other

    def matvec(self, v: Sequence[Tensor | None]) -> Vector:
        space, fd = self.space, self._fd
        params = space.local_params()
        if len(v) != len(params):
            raise ValueError(f"vector has {len(v)} tensors, the model has {len(params)} parameters")
        reshard(self.model)  # a root left gathered by an earlier bare forward would hide the perturbation
        with torch.no_grad():
            backup = fd._save(params)
        out = FlatVector(torch.zeros(space.local_numel, dtype=self.out_dtype, device=space.device),
                         [p.shape for p in params])
        in_place = space.dtype == self.out_dtype
        self.model.zero_grad(set_to_none=True)
        if in_place:  # the backward passes accumulate straight into out, as the FD HVP's do
            space.attach_grads(out)
        try:
            for batch in self._batches:
                self._batch_product(batch, params, backup, v)
                if not in_place:
                    with torch.no_grad():
                        torch._foreach_add_(out, space.local_grads())
                    self.model.zero_grad(set_to_none=True)
            if in_place:
                for name, p, mine in zip(space.names, space.params, out):
                    if mine.numel() and (p.grad is None or local_view(p.grad).data_ptr() != mine.data_ptr()):
                        raise RuntimeError(f"parameter {name}: its gradient was not accumulated in place into G v")
        finally:
            with torch.no_grad():
                _copy_back(params, backup)
            self.model.zero_grad(set_to_none=True)
        fd._shared.calls += 1
        return out

    __call__ = matvec

    def _batch_product(self, batch: dict[str, Tensor], params: Vector, backup: Vector,
                       v: Sequence[Tensor | None]) -> None:
        """Backpropagate J^T H_out J v of one batch into ``.grad``; leaves the parameters at theta."""
        fd, acc = self._fd, self.out_dtype
        with torch.no_grad():
            fd._set_params(params, backup, v, self.eps, at_backup=True)
            jv = _logits(self.model, batch)
            reshard(self.model)
            if jv.dtype != acc:
                jv = jv.to(acc)  # the difference is taken in float32 at least, where it keeps its signal
            fd._set_params(params, backup, v, -self.eps, at_backup=False)
            minus = _logits(self.model, batch)
            reshard(self.model)
            jv.sub_(minus).mul_(1.0 / (2.0 * self.eps))
            del minus
            _copy_back(params, backup)
        logits = _logits(self.model, batch)
        vocab = logits.shape[-1]
        weights = counted_positions(batch).to(device=jv.device, dtype=acc).reshape(-1) * self.loss.scale
        w = output_hessian_(jv.view(-1, vocab), logits.detach().reshape(-1, vocab), weights,
                            chunk_tokens=self._chunk_tokens).view_as(logits)
        if w.dtype != logits.dtype:
            w = w.to(logits.dtype)  # the backward's gradient in the logits' dtype, the J v buffer freed first
        del jv
        logits.backward(gradient=w)


def gauss_newton_extra_bytes(*, tokens_per_batch: int, vocab: int, chunk_tokens: int, dtype: torch.dtype) -> int:
    """Bytes ``GaussNewtonOperator`` holds at its peak beyond the model's own forward and backward of one batch
    (whose activations a gradient pass holds too): the J v buffer (tokens x vocab in ``accumulator_dtype``), the
    logits at theta kept through the backward (model dtype), and one softmax chunk (chunk x vocab, accumulator
    dtype). For a model dtype below float32 the gradient w = H_out J v is cast to the model dtype before the
    backward, for a moment beside the buffer; the larger of the two moments is counted.

    Not counted: the model's activations and the gradient-sized output, which a gradient pass holds too (a
    gradient pass also holds 3 tokens x vocab tensors of its own at its peak: the logits, their shifted copy and
    the saved log-softmax, so the figure bounds what the product adds to a gradient pass from above). Measured
    on CPU (tests/core/test_gauss_newton_memory.py: 1-layer Llama, vocab 50k, 2 x 512 tokens, float32) the
    product's peak beyond activations and output is the figure to 0.2% at chunk_tokens 128 and 1024."""
    for name, value in (("tokens_per_batch", tokens_per_batch), ("vocab", vocab), ("chunk_tokens", chunk_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    acc = accumulator_dtype(dtype)
    acc_bytes, own_bytes = acc.itemsize, dtype.itemsize
    chunk = min(chunk_tokens, tokens_per_batch)
    buffer, logits = tokens_per_batch * vocab * acc_bytes, tokens_per_batch * vocab * own_bytes
    chunk_bytes = chunk * vocab * acc_bytes
    cast = tokens_per_batch * vocab * own_bytes if acc != dtype else 0
    return buffer + logits + max(chunk_bytes, cast)


class EmpiricalFisherOperator:
    """F v = (1/n) sum_i g_i (g_i . v): g_i the gradient of sequence i's token-mean cross-entropy (its counted
    tokens as ``AnalysisLoss`` counts them), i over the n sequences with a counted token in every batch of every
    rank. The per-sequence gradients are recomputed at each product: n gradient passes of one sequence (about n / B
    gradient passes of B-row batches, B the rows per batch) and n scalar all-reduces per product.

    Under FSDP2 a backward averages the ranks' gradients, so sequence i of rank r is backpropagated by rank r
    with weight world while the other ranks backpropagate 0 x a sequence of their own (the collectives need every
    rank's pass): every rank runs n passes, n summed over the ranks. Output: local shards in ``out_dtype``.
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch], *, space: ParamSpace | None = None):
        if model.training:
            raise ValueError("the model must be in eval mode (dropout off) for the empirical Fisher")
        self._model = model
        self._space = space or ParamSpace(model)
        rows = [{k: t[i:i + 1] for k, t in as_batch(b).items() if t is not None}
                for b in batches for i in range(as_batch(b)["input_ids"].shape[0])]
        if not rows:
            raise ValueError("the analysis set has no batches")
        self._sequences = [(r, counted_tokens(r)) for r in rows if counted_tokens(r) > 0]
        self._filler = rows[0]  # what this rank backpropagates x 0 while another rank's sequence is the one
        self._world, self._rank = 1, 0
        counts = [len(self._sequences)]
        if self._space.group is not None:
            import torch.distributed as dist

            self._world, self._rank = dist.get_world_size(self._space.group), dist.get_rank(self._space.group)
            mine = torch.zeros(self._world, dtype=torch.float64)
            mine[self._rank] = len(self._sequences)
            counts = [int(c) for c in self._space.all_reduce(mine).tolist()]
        self._counts = counts
        if sum(counts) == 0:
            raise ValueError("the analysis set has no counted tokens (every label is -100 or padded)")
        self._calls = 0

    model = property(lambda self: self._model)
    space = property(lambda self: self._space)
    calls = property(lambda self: self._calls)
    sequences = property(lambda self: sum(self._counts))
    out_dtype = property(lambda self: accumulator_dtype(self._space.dtype))

    def matvec(self, v: Sequence[Tensor | None]) -> Vector:
        space = self._space
        if len(v) != len(space.params):
            raise ValueError(f"vector has {len(v)} tensors, the model has {len(space.params)} parameters")
        idx = [i for i, t in enumerate(v) if t is not None]
        out = FlatVector(torch.zeros(space.local_numel, dtype=self.out_dtype, device=space.device),
                         [p.shape for p in space.local_params()])
        n = sum(self._counts)
        try:
            for owner, count in enumerate(self._counts):
                for j in range(count):
                    self._model.zero_grad(set_to_none=True)
                    if owner == self._rank:
                        row, tokens = self._sequences[j]
                        (token_loss_sum(self._model, row) * (self._world / tokens)).backward()
                    else:
                        (token_loss_sum(self._model, self._filler) * 0.0).backward()
                    grads = space.local_grads()
                    coeff = space.dots([([grads[i] for i in idx], [v[i] for i in idx])])[0] if idx else 0.0
                    with torch.no_grad():
                        torch._foreach_add_(out, grads, alpha=float(coeff) / n)
        finally:
            self._model.zero_grad(set_to_none=True)
        self._calls += 1
        return out

    __call__ = matvec


class DifferenceOperator:
    """(A - B) v from two operators on the same parameters, e.g. H - G (the part of the Hessian the Gauss-Newton
    matrix leaves out: the logits' own curvature weighted by the loss's gradient); one product of each a matvec,
    each counted by its own operator."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    space = property(lambda self: self.first.space)
    out_dtype = property(lambda self: self.first.out_dtype)

    def matvec(self, v: Sequence[Tensor | None]) -> Vector:
        out = self.first.matvec(v)
        other = self.second.matvec(v)
        with torch.no_grad():
            torch._foreach_sub_(out, [t.to(o.dtype) for t, o in zip(other, out)])
        return out

    __call__ = matvec


def difference_operator(first, second) -> DifferenceOperator:
    """The operator A - B of two operators with matvecs on the same parameter space."""
    return DifferenceOperator(first, second)
