"""Parameter-space vectors as lists of local shards, their inner products, and probe vectors.

A vector over a model's parameters is a ``list[Tensor]`` aligned with ``ParamSpace.params``: entry i is this
rank's local shard of the vector's component for parameter i (the whole component when the model is not
sharded). All arithmetic is shard-local; inner products are local partial sums in float64 followed by one
all-reduce of a small tensor of scalars over the process group that shards the parameters.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

Vector = list[Tensor]

# Probe entries are drawn in fixed chunks of the flattened global parameter, each from its own generator,
# so that any rank can draw exactly the elements of its shard without drawing anyone else's.
PROBE_CHUNK = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    """Where a rank's local shard sits inside its global parameter."""

    name: str
    global_shape: torch.Size
    flat_start: int
    local_numel: int


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_view(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that shares storage), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_info(name: str, p: Tensor) -> ShardInfo:
    if not _is_dtensor(p):
        return ShardInfo(name, p.shape, 0, p.numel())
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or not all(isinstance(pl, (Shard, Replicate)) for pl in placements):
        raise ValueError(f"parameter {name}: only 1-D meshes with Shard/Replicate placements are supported, got {placements}")
    if isinstance(placements[0], Shard) and placements[0].dim != 0:
        raise ValueError(f"parameter {name}: only dim-0 sharding (FSDP2's layout) is supported, got {placements}")
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    row = math.prod(p.shape[1:]) if p.dim() > 0 else 1
    start = offset[0] * row if p.dim() > 0 else 0
    local = p.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(f"parameter {name}: local shard shape {tuple(local.shape)} != expected {tuple(local_shape)}")
    return ShardInfo(name, p.shape, start, local.numel())


# How long all_reduce_sum waits for gloo's worker thread to let go of a reduced tensor (it takes microseconds,
# a few milliseconds at worst on a loaded machine); past this it goes on, as a plain all_reduce would.
GLOO_RELEASE_WAIT_S = 0.5


def all_reduce_sum(scalars: Tensor, group: dist.ProcessGroup) -> None:
    """Sum ``scalars`` in place over ``group``; on CPU (gloo) return only once gloo has let go of the tensor.

    Gloo's worker thread drops its reference to a collective's tensors just after ``wait()`` returns. If the
    worker's reference is the last, it frees the tensor's Python object, and for that it takes the GIL; when
    the process is already exiting (a training script whose last act was ``analyze``), taking the GIL kills the
    thread and the process aborts with "terminate called without an active exception" (torch 2.13, about one
    exit in fifteen on a loaded 2-core machine). Holding the tensor here until gloo has dropped it makes the
    Python side's reference the last one, freed on the caller's thread.
    """
    use_count = getattr(scalars, "_use_count", None)  # private torch API: without it, a plain all-reduce
    baseline = use_count() if use_count is not None else 0
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    if scalars.device.type != "cpu" or use_count is None:
        return
    deadline = time.monotonic() + GLOO_RELEASE_WAIT_S
    while use_count() > baseline and time.monotonic() < deadline:
        time.sleep(0)  # lets the worker thread run (and take the GIL, should it need it)


class ParamSpace:
    """The trainable parameters of a model, as local shards, and the group their inner products sum over.

    For a model whose parameters are DTensors (FSDP2), scalars are all-reduced over the parameters' device
    mesh; for plain parameters every rank holds whole vectors and nothing is reduced.
    """

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        kinds = {_is_dtensor(p) for p in self.params}
        if len(kinds) > 1:
            raise ValueError("some parameters are sharded (DTensor) and some are not: shard the root module too")
        self.sharded = kinds == {True}
        self.group = self.params[0].device_mesh.get_group() if self.sharded else None
        self.shards = [_shard_info(n, p) for n, p in named]
        self.numel = sum(math.prod(s.global_shape) for s in self.shards)
        self.local_numel = sum(s.local_numel for s in self.shards)
        self.device = local_view(self.params[0]).device
        self.dtype = self.params[0].dtype

    # -- tensors of the model ------------------------------------------------------------------------------
    def local_params(self) -> Vector:
        """Views of this rank's parameter shards: editing them in place edits the model."""
        return [local_view(p.detach()) for p in self.params]

    def local_grads(self) -> Vector:
        grads = []
        for name, p in zip(self.names, self.params):
            if p.grad is None:
                raise RuntimeError(f"parameter {name} received no gradient: is it used by the loss?")
            grads.append(local_view(p.grad))
        return grads

    def attach_grads(self, local: Sequence[Tensor]) -> None:
        """Make ``local`` (one tensor per parameter, shaped like its local shard and in its dtype) the parameters'
        ``.grad``, so that the next backward passes accumulate into them in place (autograd's AccumulateGrad for
        plain parameters, FSDP2's sharded-gradient accumulation for DTensors)."""
        for p, g in zip(self.params, local, strict=True):
            if _is_dtensor(p):
                from torch.distributed.tensor import DTensor

                g = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            p.grad = g

    # -- reductions ----------------------------------------------------------------------------------------
    def all_reduce(self, scalars: Tensor, *, to_host: bool = True) -> Tensor:
        """Sum a float64 tensor of partial scalars over the group (one collective call). ``to_host=False``
        leaves the sums on the device, for coefficients the device uses next (no host sync)."""
        if self.group is not None and dist.get_world_size(self.group) > 1:
            if self.device.type != "cpu":
                scalars = scalars.to(self.device)
            all_reduce_sum(scalars, self.group)
        return scalars.cpu() if to_host else scalars

    def dots(self, pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> Tensor:
        """Global inner products <x, y> for several pairs at once, in float64, with one all-reduce."""
        partial = torch.stack([local_dot(x, y) for x, y in pairs]) if pairs else torch.zeros(0, dtype=torch.float64)
        return self.all_reduce(partial)

    def dot(self, x: Sequence[Tensor], y: Sequence[Tensor]) -> float:
        return float(self.dots([(x, y)])[0])

    def norm(self, x: Sequence[Tensor]) -> float:
        return math.sqrt(max(self.dot(x, x), 0.0))

    def zeros(self, dtype: torch.dtype | None = None) -> Vector:
        return [torch.zeros_like(p, dtype=dtype or p.dtype) for p in self.local_params()]


class FlatVector(list):
    """A Vector whose tensors are consecutive views of one flat buffer ``flat``: consumers that work on flat
    vectors (Lanczos) use the buffer directly instead of copying the pieces together."""

    def __init__(self, flat: Tensor, shapes: Sequence[torch.Size]):
        sizes = [math.prod(s) for s in shapes]
        super().__init__(t.view(s) for t, s in zip(torch.split(flat, sizes), shapes))
        self.flat = flat


def _local_sum(x: Sequence[Tensor], y: Sequence[Tensor], term: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """This rank's sum over tensors of term(a, b) (flat, in at least float32), accumulated in float64."""
    partials = []
    for a, b in zip(x, y, strict=True):
        if a.numel() == 0:
            continue
        compute = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        partials.append(term(a.reshape(-1).to(compute), b.reshape(-1).to(compute)).double())
    if not partials:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(partials).sum().cpu()  # one device sync per sum, not one per parameter


def local_dot(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """This rank's partial sum of <x, y>, accumulated in float64 per tensor (float32 products for low precision)."""
    return _local_sum(x, y, torch.dot)


def cast(x: Sequence[Tensor], dtype: torch.dtype) -> Vector:
    return [t if t.dtype == dtype else t.to(dtype) for t in x]


def axpy_(y: Vector, x: Sequence[Tensor], *, alpha: float) -> None:
    """y += alpha * x in place, casting x to y's dtype where they differ."""
    torch._foreach_add_(y, cast(x, y[0].dtype), alpha=alpha)


def _chunk_seed(seed: int, probe_index: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{probe_index}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _draw(kind: str, n: int, generator: torch.Generator) -> Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(n, generator=generator, dtype=torch.float64)
    raise ValueError(f"probe kind {kind!r}: expected 'rademacher' or 'gaussian'")


def probe_vector(
    space: ParamSpace, *, seed: int, probe_index: int, kind: str = "rademacher", dtype: torch.dtype = torch.float32
) -> Vector:
    """A random unit vector that is a pure function of (seed, probe_index, parameter names).

    Each rank draws only the elements of its own shards, so the global vector is the same for any world
    size or sharding. Rademacher entries are +-1/sqrt(P); Gaussian entries are normalized by the global norm.
    """
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe kind {kind!r}: expected 'rademacher' or 'gaussian'")
    out: Vector = []
    for shard, p in zip(space.shards, space.local_params()):
        total = math.prod(shard.global_shape)
        lo, hi = shard.flat_start, shard.flat_start + shard.local_numel
        pieces = []
        chunks = range(lo // PROBE_CHUNK, (hi - 1) // PROBE_CHUNK + 1) if hi > lo else range(0)
        for chunk in chunks:
            c0 = chunk * PROBE_CHUNK
            g = torch.Generator().manual_seed(_chunk_seed(seed, probe_index, shard.name, chunk))
            values = _draw(kind, min(PROBE_CHUNK, total - c0), g)
            pieces.append(values[max(lo, c0) - c0 : min(hi, c0 + PROBE_CHUNK) - c0])
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
        out.append(flat.reshape(p.shape))
    if kind == "rademacher":
        norm = math.sqrt(space.numel)
    else:
        norm = math.sqrt(float(space.all_reduce(local_dot(out, out).reshape(1))[0]))
    return [(t / norm).to(device=space.device, dtype=dtype) for t in out]


def block_mask(v: Sequence[Tensor], keep: Sequence[int]) -> list[Tensor | None]:
    """v with every parameter outside ``keep`` zeroed; zero parameters are ``None`` so nothing is allocated."""
    keep_set = set(keep)
    return [t if i in keep_set else None for i, t in enumerate(v)]
