"""How far several curvature approximations A of the Hessian are from the exact H v, per probe and per block.

For a probe v, h = H v (one HVP, shared by every approximation) and a = A v, with the metrics of
``block_diagonal_metrics`` per block b (rel_error_b = |h[b] - a[b]| / |h[b]|, cosine_b = cos(h[b], a[b])) and over
the whole vector (|a - h| / |h| and cos(a, h)). The approximations (``APPROXIMATIONS``):

- ``block_diagonal``: a[b] = (H v_b)[b], v_b = v zeroed outside b; B HVPs;
- ``block_tridiagonal``: a[b] = (H (v_{b-1} + v_b + v_{b+1}))[b], neighbours in the order of ``blocks`` (model
  order: the transformer layers in sequence); B HVPs;
- ``lowrank``: a = U diag(lambda) U^T v from given eigenpairs of H (the top k); no HVP;
- ``block_diagonal_plus_lowrank``: the block-diagonal a plus W diag(mu) W^T v, with (mu, W) given eigenpairs of
  R = H - B (B the block-diagonal part), the k of largest magnitude: the rank-k correction of what the block
  diagonal misses. ``block_residual_operator`` is R's matvec (1 + B HVPs), for ``thick_restart_lanczos(...,
  which="LM")``; it shares the block-diagonal HVPs when both block approximations are asked for;
- ``gauss_newton``: a = G v from a given matvec (``GaussNewtonOperator``).

The low-rank kinds may carry their rank in the name (``lowrank_8``, ``block_diagonal_plus_lowrank_8``: the 8 given
pairs of largest magnitude), so that one call measures several ranks from one set of pairs; without it they use
every pair given (``parse_approximation``).

Everything is shard-local; the low-rank coefficients take one all-reduce each and every metric scalar goes into
one final all-reduce.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .blocks import BlockMetrics, summarize
from .vectors import ParamSpace, Vector, block_mask, local_dot

APPROXIMATIONS = ("block_diagonal", "block_tridiagonal", "lowrank", "block_diagonal_plus_lowrank", "gauss_newton")
LOW_RANK = ("lowrank", "block_diagonal_plus_lowrank")
_RANKED = re.compile(r"^(lowrank|block_diagonal_plus_lowrank)_(\d+)$")
NAMES = ("block_diagonal", "block_tridiagonal", "lowrank_<k>", "block_diagonal_plus_lowrank_<k>", "gauss_newton")


def parse_approximation(name: str) -> tuple[str, int | None]:
    """(kind, rank) of an approximation's name: ``lowrank_8`` -> ("lowrank", 8); ``lowrank`` -> ("lowrank", None)
    (every pair given); rank None for the kinds that have none."""
    if name in APPROXIMATIONS:
        return name, None
    found = _RANKED.match(name) if isinstance(name, str) else None
    if found is None or int(found.group(2)) < 1:
        raise ValueError(f"unknown approximation {name!r}; valid: {', '.join(NAMES)} (k >= 1)")
    return found.group(1), int(found.group(2))


def lowrank_ranks(names: Sequence[str]) -> dict[str, int]:
    """The most eigenpairs each low-rank kind among ``names`` needs: {"lowrank": k, "block_diagonal_plus_lowrank":
    k'} (a kind absent when no name of it has a rank); smaller ranks use the leading pairs of those."""
    ranks: dict[str, int] = {}
    for name in names:
        kind, k = parse_approximation(name)
        if k:
            ranks[kind] = max(ranks.get(kind, 0), k)
    return ranks


def _leading(pairs: Eigenpairs, k: int | None, name: str) -> Eigenpairs:
    """The k pairs of largest magnitude (all for k None)."""
    values, vectors = pairs
    if k is not None and k > len(values):
        raise ValueError(f"approximation {name!r} needs {k} eigenpairs, {len(values)} were given")
    order = sorted(range(len(values)), key=lambda i: -abs(float(values[i])))[:k]
    return [values[i] for i in order], [vectors[i] for i in order]

Matvec = Callable[[Sequence[Tensor | None]], Vector]
Eigenpairs = tuple[Sequence[float], Sequence[Sequence[Tensor]]]


def _check_pairs(name: str, pairs: Eigenpairs | None, approximation: str) -> None:
    if pairs is None:
        raise ValueError(f"approximation {approximation!r} needs {name}=(values, vectors), got None")
    values, vectors = pairs
    if len(values) != len(vectors) or len(values) == 0:
        raise ValueError(f"{name}: expected as many vectors as values (at least one), got {len(values)} values "
                         f"and {len(vectors)} vectors")


def _low_rank_product(pairs: Eigenpairs, v: Sequence[Tensor], *, space: ParamSpace, dtype: torch.dtype) -> Vector:
    """sum_i values[i] u_i <u_i, v>, the inner products in one all-reduce."""
    values, vectors = pairs
    coeffs = space.dots([(u, v) for u in vectors]).tolist()
    out = [torch.zeros_like(t, dtype=dtype) for t in v]
    for value, coeff, u in zip(values, coeffs, vectors):
        torch._foreach_add_(out, [t.to(dtype) for t in u], alpha=float(value) * coeff)
    return out


def _neighbours(blocks: dict[str, list[int]]) -> list[list[int]]:
    """Each block's indices together with those of the blocks before and after it in ``blocks``' order."""
    idx = list(blocks.values())
    return [[i for j in range(max(k - 1, 0), min(k + 2, len(idx))) for i in idx[j]] for k in range(len(idx))]


def block_residual_operator(matvec: Matvec, *, blocks: dict[str, list[int]]) -> Matvec:
    """The matvec of R = H - B, with B the block-diagonal part of H over ``blocks``: R v = H v - sum_b (H v_b)[b];
    1 + B HVPs a product (a block where v is zero costs none). Entries of v may be None (zero)."""
    def residual(v: Sequence[Tensor | None]) -> Vector:
        out = matvec(list(v))
        for idx in blocks.values():
            if all(v[i] is None for i in idx):
                continue
            hb = matvec(block_mask(v, idx))
            with torch.no_grad():
                torch._foreach_sub_([out[i] for i in idx], [hb[i].to(out[i].dtype) for i in idx])
            del hb
        return out

    return residual


def _sums(h: Sequence[Tensor], a: Sequence[Tensor]) -> Tensor:
    """This rank's (|h - a|^2, |h|^2, |a|^2, <h, a>) over the given tensors."""
    a = [t.to(x.dtype) for t, x in zip(a, h)]
    diff = [x - y for x, y in zip(h, a)]
    return torch.stack([local_dot(diff, diff), local_dot(h, h), local_dot(a, a), local_dot(h, a)])


def approximation_metrics(matvec: Matvec, v: Sequence[Tensor], *, space: ParamSpace, blocks: dict[str, list[int]],
                          approximations: Sequence[str], lowrank: Eigenpairs | None = None,
                          residual_lowrank: Eigenpairs | None = None, gauss_newton: Matvec | None = None,
                          on_hvp: Callable[[int, int], None] | None = None) -> dict[str, BlockMetrics]:
    """Per-block and whole-vector metrics of each approximation in ``approximations`` against H v, one H v shared.

    ``lowrank`` / ``residual_lowrank``: (values, vectors) with vectors as lists of local shards (eigenpairs of H,
    and of H - B); ``gauss_newton``: G's matvec. ``on_hvp(done, total)`` counts the operator products: 1 (H v),
    + B when block_diagonal or block_diagonal_plus_lowrank is asked (the two share them), + B for block_tridiagonal,
    + 1 for gauss_newton (a G v costs about 1.5 gradient passes, an FD HVP 2)."""
    wanted = list(dict.fromkeys(approximations))
    if not wanted:
        raise ValueError(f"approximations {list(approximations)!r}: expected a non-empty list of {NAMES}")
    kinds = {a: parse_approximation(a) for a in wanted}
    for a, (kind, k) in kinds.items():
        if kind == "lowrank":
            _check_pairs("lowrank", lowrank, a)
        elif kind == "block_diagonal_plus_lowrank":
            _check_pairs("residual_lowrank", residual_lowrank, a)
    if "gauss_newton" in wanted and gauss_newton is None:
        raise ValueError("approximation 'gauss_newton' needs gauss_newton=<the Gauss-Newton matvec>, got None")
    if len(v) != len(space.params):
        raise ValueError(f"vector has {len(v)} tensors, the model has {len(space.params)} parameters")

    diagonal = any(kind in ("block_diagonal", "block_diagonal_plus_lowrank") for kind, _ in kinds.values())
    total = 1 + len(blocks) * (diagonal + ("block_tridiagonal" in wanted)) + ("gauss_newton" in wanted)
    done = 0

    def count() -> None:
        nonlocal done
        done += 1
        if on_hvp:
            on_hvp(done, total)

    h = matvec(list(v))
    count()
    dtype = h[0].dtype
    # whole-vector approximations first (their low-rank coefficients need an all-reduce of their own)
    whole: dict[str, Vector] = {}
    corrections: dict[str, Vector] = {}
    for a, (kind, k) in kinds.items():
        if kind == "lowrank":
            whole[a] = _low_rank_product(_leading(lowrank, k, a), v, space=space, dtype=dtype)
        elif kind == "block_diagonal_plus_lowrank":
            corrections[a] = _low_rank_product(_leading(residual_lowrank, k, a), v, space=space, dtype=dtype)
    if "gauss_newton" in wanted:
        whole["gauss_newton"] = gauss_newton(list(v))
        count()

    partial: dict[str, list[Tensor]] = {a: [] for a in wanted}
    tridiagonal = _neighbours(blocks)
    for k, idx in enumerate(blocks.values()):
        h_in = [h[i] for i in idx]
        if diagonal:
            hb = matvec(block_mask(v, idx))
            count()
            hb_in = [hb[i] for i in idx]
            if "block_diagonal" in wanted:
                partial["block_diagonal"].append(_sums(h_in, hb_in))
            for name, correction in corrections.items():
                plus = [a.to(dtype) + correction[i] for a, i in zip(hb_in, idx)]
                partial[name].append(_sums(h_in, plus))
            del hb, hb_in
        if "block_tridiagonal" in wanted:
            ht = matvec(block_mask(v, tridiagonal[k]))
            count()
            partial["block_tridiagonal"].append(_sums(h_in, [ht[i] for i in idx]))
            del ht
        for name, a in whole.items():
            partial[name].append(_sums(h_in, [a[i] for i in idx]))
    stacked = torch.stack([torch.stack(partial[a]) for a in wanted])  # [approximations, blocks, 4]
    sums = space.all_reduce(stacked).tolist()
    return {a: summarize(list(blocks), rows) for a, rows in zip(wanted, sums)}
