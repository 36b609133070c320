"""Spectra of diagonal Hessian blocks H_bb: the operator restricted to one block of parameters, and its SLQ.

For a block b (a set of parameter indices of a ParamSpace), H_bb v = (H [v on b, 0 elsewhere])[b]. The
block's vectors hold only the block's parameters (a sub-space of the same process group), so Lanczos stores
and orthogonalizes block-sized vectors; each matvec is still one full FD HVP (2 gradient passes). The same
sub-space also serves to analyse a chosen subset of parameters (``analyze(param_filter=...)``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .lanczos import LanczosResult, lanczos
from .vectors import ParamSpace, Vector, probe_vector


def block_space(space: ParamSpace, indices: Sequence[int]) -> ParamSpace:
    """The sub-space of ``space`` holding only the parameters ``indices`` (same process group)."""
    indices = list(indices)
    if not indices:
        raise ValueError("a block needs at least one parameter")
    if len(set(indices)) != len(indices) or not all(0 <= i < len(space.params) for i in indices):
        raise ValueError(f"block indices must be distinct parameter indices in [0, {len(space.params)}), got {indices}")
    sub = copy.copy(space)
    sub.names = [space.names[i] for i in indices]
    sub.params = [space.params[i] for i in indices]
    sub.shards = [space.shards[i] for i in indices]
    sub.numel = sum(math.prod(s.global_shape) for s in sub.shards)
    sub.local_numel = sum(s.local_numel for s in sub.shards)
    return sub


class BlockOperator:
    """v_b -> (H [v_b on the block, 0 elsewhere]) restricted to the block, for any full-space operator
    ``matvec`` that accepts ``None`` for zero parameters (FiniteDifferenceHVP does, and skips them)."""

    def __init__(self, matvec: Callable[[Sequence[Tensor | None]], Vector], *, num_params: int,
                 indices: Sequence[int]):
        self._matvec = matvec
        self._num_params = num_params
        self._indices = tuple(indices)

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        if len(v) != len(self._indices):
            raise ValueError(f"block vector has {len(v)} tensors, the block has {len(self._indices)} parameters")
        full: list[Tensor | None] = [None] * self._num_params
        for i, t in zip(self._indices, v):
            full[i] = t
        h = self._matvec(full)
        return [h[i] for i in self._indices]

    __call__ = matvec


def block_spectrum(matvec: Callable[[Sequence[Tensor | None]], Vector], *, space: ParamSpace,
                   indices: Sequence[int], probe_id: int, seed: int, steps: int, reorth: str = "full",
                   window: int = 8, vector_dtype: torch.dtype = torch.float64, vectors: str = "device") -> LanczosResult:
    """One SLQ probe of H_bb: Lanczos from a Rademacher probe over the block's parameters.

    The probe is a pure function of (seed, probe_id, the block's parameter names), like the full probes.
    ``steps`` is capped at the block's dimension; ``vectors``: where the kept vectors live (hessian_core.lanczos)."""
    sub = block_space(space, indices)
    op = BlockOperator(matvec, num_params=len(space.params), indices=indices)
    v0 = probe_vector(sub, seed=seed, probe_index=probe_id, dtype=vector_dtype)
    return lanczos(op.matvec, v0, space=sub, steps=min(steps, sub.numel), reorth=reorth, window=window,
                   vector_dtype=vector_dtype, vectors=vectors)
