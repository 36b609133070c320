"""Block-diagonal analysis (the paper's section 6): how far H v is from its block-diagonal approximation.

Blocks are one per transformer layer (the modules FSDP shards one by one, named by module path) and one per
parameter-owning module outside the layers. For a probe v and block b, with h = H v and h_b = H v_b (v zeroed
outside b): rel_error_b = |h[b] - h_b[b]| / |h[b]| and cosine_b = cos(h[b], h_b[b]). The whole approximation
sum_b h_b[b] errs by |sum_b h_b[b] - h| / |h| = sqrt(sum_b |h[b] - h_b[b]|^2) / |h|, since blocks partition
the parameters. Costs 1 + B HVPs per probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .sharding import transformer_blocks
from .vectors import ParamSpace, Vector, block_mask, local_dot


def parameter_blocks(model: nn.Module, space: ParamSpace) -> dict[str, list[int]]:
    """Block name -> indices into ``space.params``, in parameter order of first appearance."""
    layer_paths = [path for path, _ in transformer_blocks(model)]
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(space.names):
        owner = next((lp for lp in layer_paths if name.startswith(lp + ".")), None)
        if owner is None:
            owner = name.rsplit(".", 1)[0] if "." in name else name
        blocks.setdefault(owner, []).append(i)
    return blocks


@dataclass(frozen=True)
class BlockMetrics:
    blocks: list[str]
    rel_error: list[float]
    cosine: list[float]
    whole_rel_error: float
    whole_cosine: float = math.nan  # cos(A v, H v) over the whole vector


def block_diagonal_metrics(matvec: Callable[[Sequence[Tensor | None]], Vector], v: Sequence[Tensor], *,
                           space: ParamSpace, blocks: dict[str, list[int]],
                           on_hvp: Callable[[int, int], None] | None = None) -> BlockMetrics:
    """Compare H v with H v_b restricted to each block b; every scalar goes into one final all-reduce."""
    total_hvps = 1 + len(blocks)
    h = matvec(list(v))
    if on_hvp:
        on_hvp(1, total_hvps)
    partial = []
    for k, idx in enumerate(blocks.values()):
        hb = matvec(block_mask(v, idx))
        h_in = [h[i] for i in idx]
        hb_in = [hb[i] for i in idx]
        diff = [a - b for a, b in zip(h_in, hb_in)]
        partial.append(torch.stack([local_dot(diff, diff), local_dot(h_in, h_in), local_dot(hb_in, hb_in),
                                    local_dot(h_in, hb_in)]))
        del hb
        if on_hvp:
            on_hvp(k + 2, total_hvps)
    sums = space.all_reduce(torch.stack(partial)).tolist()
    return summarize(list(blocks), sums)


def summarize(names: list[str], sums: Sequence[Sequence[float]]) -> BlockMetrics:
    """BlockMetrics from each block's global (|h - a|^2, |h|^2, |a|^2, <h, a>), h = H v and a = A v in block b:
    blocks partition the parameters, so the whole vector's sums are the sums over blocks."""
    rel, cos = [], []
    for diff2, h2, a2, cross in sums:
        rel.append(math.sqrt(diff2 / h2) if h2 > 0 else float("nan"))
        cos.append(cross / math.sqrt(h2 * a2) if h2 > 0 and a2 > 0 else float("nan"))
    diff2, h2, a2, cross = (sum(row[j] for row in sums) for j in range(4))
    whole = math.sqrt(diff2 / h2) if h2 > 0 else float("nan")
    whole_cos = cross / math.sqrt(h2 * a2) if h2 > 0 and a2 > 0 else float("nan")
    return BlockMetrics(names, rel, cos, whole, whole_cos)
