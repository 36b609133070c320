"""What users measure with eigenvectors (hessian_core.eigenpairs): where each one's mass lives in the network,
the loss along them, how much of the gradient lies in their span, and how two sets of them overlap.

Every function takes vectors as local shards (a ``Vector`` per eigenvector, aligned with a ``ParamSpace``) and
reduces only scalars, so on an FSDP2 group every rank calls it with its own shards and nothing is gathered.
Functions that run the model do so under ``preserved_state`` (eval mode, float64 numerics, the model given back
exactly as found) and perturb the local parameter shards in place, as the FD HVP does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .api import ParamFilter, _space, preserved_state
from .blocks import parameter_blocks
from .eigen import EigenResult
from .loss import AnalysisLoss, Batch, LossFn, accumulate_gradient, evaluate_loss
from .sharding import reshard
from .vectors import ParamSpace, Vector, local_dot


def _vectors_and_space(vectors: EigenResult | Sequence[Vector], space: ParamSpace | None) -> tuple[list[Vector],
                                                                                                   ParamSpace | None]:
    if isinstance(vectors, EigenResult):
        return list(vectors.eigenvectors), space or vectors.space
    return [list(v) for v in vectors], space


# -- where curvature lives -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EigenMass:
    """Each eigenvector's squared mass per parameter tensor and per block, each row summing to 1.

    ``per_tensor`` [k, P] over ``tensors`` (the ParamSpace's names), ``per_block`` [k, B] over ``blocks``;
    ``block_of[p]`` is tensor p's block."""

    tensors: list[str]
    blocks: list[str]
    block_of: list[str]
    per_tensor: np.ndarray
    per_block: np.ndarray

    def to_arrow(self):
        """One row per eigenvector and tensor (``eigen_mass.parquet``): eigenvector int32, block, tensor, mass."""
        import pyarrow as pa

        k, p = self.per_tensor.shape
        return pa.table({"eigenvector": pa.array(np.repeat(np.arange(k, dtype=np.int32), p)),
                         "block": pa.array(self.block_of * k, pa.string()),
                         "tensor": pa.array(self.tensors * k, pa.string()),
                         "mass": pa.array(self.per_tensor.reshape(-1), pa.float64())})


def eigen_mass(vectors: EigenResult | Sequence[Vector], *, space: ParamSpace | None = None,
               model: nn.Module | None = None, blocks: Mapping[str, Sequence[int]] | None = None) -> EigenMass:
    """|u[tensor]|^2 / |u|^2 for each eigenvector u and parameter tensor, and its sums over blocks: ``blocks``
    (name -> indices into ``space.params``, a partition), else ``parameter_blocks(model, space)`` (one block per
    transformer layer and per module outside them), else one block per tensor. One all-reduce of k x P scalars."""
    vecs, space = _vectors_and_space(vectors, space)
    if space is None:
        raise ValueError("eigen_mass needs the vectors' ParamSpace (an EigenResult carries it)")
    if blocks is None:
        blocks = parameter_blocks(model, space) if model is not None else {n: [i] for i, n in enumerate(space.names)}
    owner = [None] * len(space.names)
    for name, idx in blocks.items():
        for i in idx:
            if owner[i] is not None:
                raise ValueError(f"parameter {space.names[i]} is in blocks {owner[i]!r} and {name!r}")
            owner[i] = name
    if None in owner:
        raise ValueError(f"the blocks leave out {[n for n, o in zip(space.names, owner) if o is None]}")
    partial = torch.stack([torch.stack([local_dot([t], [t]) for t in v]) for v in vecs])
    per_tensor = space.all_reduce(partial).numpy()
    per_tensor = per_tensor / per_tensor.sum(axis=1, keepdims=True)
    names = list(blocks)
    per_block = np.stack([per_tensor[:, list(blocks[name])].sum(axis=1) for name in names], axis=1)
    return EigenMass(list(space.names), names, owner, per_tensor, per_block)


# -- landscape slices ------------------------------------------------------------------------------------------

def _losses_at(model: nn.Module, batches: Sequence[Batch], directions: Sequence[Sequence[Tensor]],
               points: Sequence[Sequence[float]], *, loss_fn: LossFn | None, space: ParamSpace | None,
               param_filter: ParamFilter | None) -> list[float]:
    """The analysis loss at theta + sum_d c_d u_d for each point c: one forward over the set each, every one from
    the retained copy of the parameters (no drift), and the parameters put back bitwise after."""
    with preserved_state(model):
        space = space or _space(model, param_filter)
        loss = AnalysisLoss(batches, loss_fn=loss_fn, space=space)
        params = space.local_params()
        for d in directions:
            if len(d) != len(params):
                raise ValueError(f"a direction has {len(d)} tensors, the space has {len(params)} parameters")
        cast = [[t.to(p.dtype) for t, p in zip(d, params)] for d in directions]
        reshard(model)  # a root left gathered by an earlier forward would not see the shards move
        with torch.no_grad():
            backup = [p.clone() for p in params]
        out = []
        try:
            for point in points:
                with torch.no_grad():
                    torch._foreach_copy_(params, backup)
                    for d, c in zip(cast, point):
                        if c != 0.0:
                            torch._foreach_add_(params, d, alpha=float(c))
                out.append(evaluate_loss(model, loss.batches, space=space, loss=loss))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
    return out


# landscape_range's default: the slice reaches where the quadratic model has raised the loss by this x |loss|
LANDSCAPE_RISE = 1.0


def landscape_range(eigenvalue: float, loss: float, *, rise: float = LANDSCAPE_RISE) -> float:
    """The half-width t of a slice along a unit eigenvector with eigenvalue ``eigenvalue`` where the quadratic
    model's change 1/2 |lambda| t^2 is ``rise`` x |loss| (1: the quadratic term alone doubles the loss at the
    ends, a change the plot shows); 1.0 where lambda or the loss is zero or not finite."""
    if not (math.isfinite(eigenvalue) and math.isfinite(loss)) or eigenvalue == 0 or loss == 0:
        return 1.0
    return math.sqrt(2.0 * rise * abs(loss) / abs(eigenvalue))


def landscape_grid(points: int, half_width: float) -> np.ndarray:
    """``points`` (odd, >= 3) equally spaced values over [-half_width, half_width]: i x half_width / (points // 2)
    for i = -points // 2 .. points // 2, so 0 is exactly among them and the grid is exactly symmetric."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"a landscape grid needs an odd number of points >= 3, got {points}")
    half = points // 2
    return np.arange(-half, half + 1, dtype=np.float64) * (half_width / half)


def curvature_at_0(ts: Sequence[float], losses: Sequence[float], *,
                   eps_mach: float = float(np.finfo(np.float64).eps)) -> tuple[float, float]:
    """(the second difference at t = 0, its truncation-and-rounding bound) of a ``landscape_grid`` slice along a
    unit eigenvector, which equals the eigenvalue up to that bound: (L(h) - 2 L(0) + L(-h)) / h^2 errs by
    h^2 / 12 x L''''(xi), estimated by the fourth difference of the five points around 0 (x2 for its variation
    over [-2h, 2h]), plus the round-off 4 eps_mach |L(0)| / h^2 (eps_mach: the loss's precision). The
    bound is nan on a grid of 3 points."""
    ts, f = np.asarray(ts, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    c = len(ts) // 2
    h = float(ts[c + 1] - ts[c])
    second = float((f[c + 1] - 2 * f[c] + f[c - 1]) / h ** 2)
    if len(ts) < 5:
        return second, math.nan
    fourth = float((f[c - 2] - 4 * f[c - 1] + 6 * f[c] - 4 * f[c + 1] + f[c + 2]) / h ** 4)
    return second, 2 * h ** 2 / 12 * abs(fourth) + 4 * eps_mach * abs(float(f[c])) / h ** 2


def landscape_1d(model: nn.Module, batches: Sequence[Batch], u: Sequence[Tensor], ts: Sequence[float], *,
                 loss_fn: LossFn | None = None, space: ParamSpace | None = None,
                 param_filter: ParamFilter | None = None) -> np.ndarray:
    """The loss at theta + t u for each t (u: local shards on ``space``, default the model's trainable
    parameters or ``param_filter``'s). For a unit eigenvector u, (L(h) - 2 L(0) + L(-h)) / h^2 -> lambda as
    h -> 0 (error h^2/12 x the fourth derivative along u)."""
    return np.array(_losses_at(model, batches, [u], [(float(t),) for t in ts], loss_fn=loss_fn, space=space,
                               param_filter=param_filter))


def landscape_2d(model: nn.Module, batches: Sequence[Batch], u1: Sequence[Tensor], u2: Sequence[Tensor],
                 ss: Sequence[float], ts: Sequence[float], *, loss_fn: LossFn | None = None,
                 space: ParamSpace | None = None, param_filter: ParamFilter | None = None) -> np.ndarray:
    """The loss at theta + s u1 + t u2 on the grid, [len(ss), len(ts)] (row i: s = ss[i])."""
    points = [(float(s), float(t)) for s in ss for t in ts]
    losses = _losses_at(model, batches, [u1, u2], points, loss_fn=loss_fn, space=space, param_filter=param_filter)
    return np.array(losses).reshape(len(ss), len(ts))


# -- the gradient in the top subspace --------------------------------------------------------------------------

@dataclass(frozen=True)
class GradientFraction:
    """|P g|^2 / |g|^2 for P the orthogonal projector on span(u_1..u_k); ``per_vector[i]`` = <u_i, g>^2 / |g|^2
    (they sum to ``fraction`` when the u_i are orthonormal)."""

    fraction: float
    per_vector: np.ndarray
    grad_norm: float
    loss: float


def _projected_fraction(gram: np.ndarray, b: np.ndarray, g2: float) -> float:
    """b^T G^-1 b / g2 by a Cholesky solve: the projector on the span of vectors with Gram matrix G."""
    chol = np.linalg.cholesky(gram)
    y = np.linalg.solve(chol, b)
    return float(y @ y) / g2


def gradient_fraction(model: nn.Module, batches: Sequence[Batch], vectors: EigenResult | Sequence[Vector], *,
                      loss_fn: LossFn | None = None, space: ParamSpace | None = None,
                      param_filter: ParamFilter | None = None) -> GradientFraction:
    """The fraction of |grad L|^2 inside span(vectors): one gradient pass, then one all-reduce of the
    k(k+1)/2 + k + 1 inner products. The vectors need not be orthonormal (their Gram matrix is used)."""
    vecs, space = _vectors_and_space(vectors, space)
    with preserved_state(model):
        space = space or _space(model, param_filter)
        loss = AnalysisLoss(batches, loss_fn=loss_fn, space=space)
        value = accumulate_gradient(model, loss.batches, loss=loss)
        g = space.local_grads()
        k = len(vecs)
        pairs = [(g, g)] + [(u, g) for u in vecs] + [(vecs[i], vecs[j]) for i in range(k) for j in range(i, k)]
        sums = space.dots(pairs).numpy()
        total = float(space.all_reduce(value.double().reshape(1))[0])
        model.zero_grad(set_to_none=True)
    g2, b = float(sums[0]), sums[1:k + 1]
    gram = np.zeros((k, k))
    gram[np.triu_indices(k)] = sums[k + 1:]
    gram = gram + np.triu(gram, 1).T
    world = torch.distributed.get_world_size(space.group) if space.group is not None else 1
    return GradientFraction(_projected_fraction(gram, b, g2), b ** 2 / g2, math.sqrt(g2), total / world)


# -- two sets of eigenvectors ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubspaceOverlap:
    """``matrix[i, j]`` = |<u_i, u'_j>| (the cosines for unit vectors); ``cosines`` of the principal angles
    between span(U) and span(U'), descending, and the ``angles`` (radians, ascending)."""

    matrix: np.ndarray
    cosines: np.ndarray
    angles: np.ndarray


def subspace_overlap(first: EigenResult | Sequence[Vector], second: EigenResult | Sequence[Vector],
                     space: ParamSpace | None = None) -> SubspaceOverlap:
    """The overlap matrix and principal angles between two sets of vectors on the same parameters (the same
    names and sharding, e.g. eigenvectors of two checkpoints loaded onto one model): one all-reduce of the
    k x k' cross products and both Gram matrices; the angles come from the SVD of L^-1 M L'^-T (L, L' the
    Gram matrices' Cholesky factors), which is U^T U' for orthonormal sets."""
    u, space_u = _vectors_and_space(first, space)
    w, space_w = _vectors_and_space(second, space)
    space = space or space_u or space_w
    if space is None:
        raise ValueError("subspace_overlap needs the vectors' ParamSpace (an EigenResult carries it)")
    k1, k2 = len(u), len(w)
    pairs = ([(a, b) for a in u for b in w] + [(u[i], u[j]) for i in range(k1) for j in range(i, k1)]
             + [(w[i], w[j]) for i in range(k2) for j in range(i, k2)])
    sums = space.dots(pairs).numpy()
    cross = sums[:k1 * k2].reshape(k1, k2)
    grams = []
    offset = k1 * k2
    for k in (k1, k2):
        gram = np.zeros((k, k))
        count = k * (k + 1) // 2
        gram[np.triu_indices(k)] = sums[offset:offset + count]
        grams.append(gram + np.triu(gram, 1).T)
        offset += count
    return overlap_of_products(cross, grams[0], grams[1])


def overlap_of_products(cross: np.ndarray, gram_first: np.ndarray, gram_second: np.ndarray) -> SubspaceOverlap:
    """The SubspaceOverlap of two sets from their inner products: ``cross[i, j]`` = <u_i, u'_j> and each set's Gram
    matrix (the angles from the SVD of L^-1 M L'^-T, L and L' the Gram matrices' Cholesky factors)."""
    l1, l2 = np.linalg.cholesky(gram_first), np.linalg.cholesky(gram_second)
    core = np.linalg.solve(l1, np.linalg.solve(l2, cross.T).T)
    cosines = np.clip(np.linalg.svd(core, compute_uv=False), 0.0, 1.0)
    return SubspaceOverlap(np.abs(cross), cosines, np.arccos(cosines))
