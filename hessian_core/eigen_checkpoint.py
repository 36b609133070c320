"""Thick-restart Lanczos states saved by each rank and resumable at any world size (the layout of
``hessian_core.checkpoint``, one folder per saved state)::

    state-000002-0000043/meta.json                 k, which, tol, seed, size, hvps, restarts, draws, norm_estimate,
                                                   stopped, projected, the writers' world size, meta
    state-000002-0000043/rank-00000-of-00002.pt    this rank's elements of rows[:size + 1] (the basis and the
                                                   next vector), keyed by parameter name and offset
    state-000002-0000043/rank-00000-of-00002.done  this rank's part is in place
    state-000002-0000043/COMPLETE                  every rank's is: the state can be resumed

The folder is named by restarts and HVPs, so saves are ordered however often a run saves. Saved after a restart a
state holds only the kept vectors and the next one (about half the basis). Every file is written under a
temporary name and renamed; the rank that finds every part done writes ``COMPLETE`` and then removes older
states. ``load_eigen_state`` cuts each rank's elements out of whatever world size wrote them (the same bits),
and the float64 scalars go through JSON, which keeps every bit of a double.

The converged eigenvectors themselves are saved apart, as a torch.distributed.checkpoint folder (``save_eigenvectors``):
one entry per eigenvector, each a mapping of parameter name -> tensor shaped like the parameter, which
``dcp.load`` reads at any world size into a model-shaped mapping (DTensors on an FSDP2 group, plain tensors in one
process).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from .checkpoint import MARKER, _layout, _part, gather_local
from .eigen import EigenState
from .files import atomic_text, atomic_write
from .vectors import ParamSpace

_STATE = re.compile(r"^state-(\d{6})-(\d{7})$")


def _state_dir(folder: str, restarts: int, hvps: int) -> str:
    return os.path.join(folder, f"state-{restarts:06d}-{hvps:07d}")


def _saved(folder: str) -> list[str]:
    """The state folders' names, oldest first."""
    return sorted(name for name in os.listdir(folder) if _STATE.match(name)) if os.path.isdir(folder) else []


def save_eigen_state(state: EigenState, *, folder: str, space: ParamSpace | None = None, rank: int = 0,
                     world_size: int = 1, meta: dict | None = None) -> str:
    """Write this rank's part of ``state`` (every rank of the group calls it at the same point, with its own
    part), its elements named by ``space``'s layout (default: the one the state was started or loaded with); the
    last rank to finish completes the save and prunes older ones. Returns the state's folder."""
    target = _state_dir(folder, state.restarts, state.hvps)
    os.makedirs(target, exist_ok=True)
    part = _part(rank, world_size)
    layout = _layout(space) if space is not None else state.layout
    if not layout:
        raise ValueError("the state has no layout (one made by eigen_start or load_eigen_state has): pass space")
    payload = {"flat": state.rows[:state.size + 1].cpu(), "layout": layout}
    atomic_write(os.path.join(target, f"{part}.pt"), lambda tmp: torch.save(payload, tmp))
    if rank == 0:
        scalars = {"k": state.k, "which": state.which, "tol": state.tol, "seed": state.seed, "size": state.size,
                   "hvps": state.hvps, "restarts": state.restarts, "draws": state.draws,
                   "norm_estimate": state.norm_estimate, "stopped": state.stopped, "basis": state.basis,
                   "projected": state.projected.tolist(), "world_size": world_size}
        atomic_text(os.path.join(target, "meta.json"), json.dumps({**(meta or {}), **scalars}, sort_keys=True),
                    sync=True)
    atomic_text(os.path.join(target, f"{part}.done"), "ok\n", sync=True)
    parts = [_part(r, world_size) for r in range(world_size)]
    if all(os.path.exists(os.path.join(target, f"{p}.done")) for p in parts):  # rank 0's meta came before its mark
        atomic_text(os.path.join(target, MARKER), "ok\n", sync=True)
        for name in _saved(folder):
            if name < os.path.basename(target):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return target


def latest_eigen_state(folder: str) -> tuple[str, dict] | None:
    """(state folder, meta) of the newest complete save in ``folder``, or None."""
    for name in reversed(_saved(folder)):
        path = os.path.join(folder, name)
        if os.path.exists(os.path.join(path, MARKER)):
            with open(os.path.join(path, "meta.json")) as f:
                return path, json.load(f)
    return None


def load_eigen_state(path: str, *, space: ParamSpace, device: torch.device | None = None) -> EigenState:
    """The state saved in ``path`` (a folder ``latest_eigen_state`` named), laid out for this rank of ``space``
    whatever world size wrote it."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    files = [os.path.join(path, f"{_part(r, meta['world_size'])}.pt") for r in range(meta["world_size"])]
    saved = gather_local(files, space, what=f"eigen state {path}")
    rows = torch.zeros((meta["basis"] + 1, space.local_numel), dtype=saved.dtype, device=device or space.device)
    rows[:saved.shape[0]].copy_(saved)
    return EigenState(k=meta["k"], which=meta["which"], tol=meta["tol"], rows=rows,
                      projected=torch.tensor(meta["projected"], dtype=torch.float64),
                      shapes=[p.shape for p in space.local_params()], seed=meta["seed"], size=meta["size"],
                      hvps=meta["hvps"], restarts=meta["restarts"], draws=meta["draws"],
                      norm_estimate=meta["norm_estimate"], stopped=meta["stopped"], layout=_layout(space))


def discard_incomplete(folder: str) -> None:
    """Before a run resumes from its latest complete state: remove the saves a killed group left incomplete,
    whose parts (possibly from a group of another size) a later save of the same name would otherwise find."""
    for name in _saved(folder):
        if not os.path.exists(os.path.join(folder, name, MARKER)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# -- eigenvectors as a torch.distributed.checkpoint folder ------------------------------------------------------

def eigenvector_key(index: int) -> str:
    """The entry of eigenvector ``index`` (0 = the best, as in ``EigenResult``) in a saved folder: a mapping of
    parameter name -> tensor, which DCP stores under ``eigenvector_<index>.<parameter name>``."""
    return f"eigenvector_{index}"


def partial_folder(folder: str) -> str:
    """Where ``save_eigenvectors`` writes before the folder is renamed into place: a hidden sibling."""
    path = os.path.abspath(folder)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def _collective(space: ParamSpace) -> bool:
    import torch.distributed as dist

    return space.group is not None and dist.is_initialized()


def eigenvector_state_dict(vectors, *, space: ParamSpace) -> dict[str, dict[str, torch.Tensor]]:
    """{eigenvector_key(i): {parameter name: tensor}} of ``vectors`` (Vectors of local shards on ``space``): on an
    FSDP2-sharded space each tensor is a DTensor with its parameter's mesh and placements made from the local
    shard (no copy, no gather), else the whole tensor."""
    from torch.distributed.tensor import DTensor

    from .vectors import local_view

    out = {}
    for i, u in enumerate(vectors):
        if len(u) != len(space.params):
            raise ValueError(f"eigenvector {i} has {len(u)} tensors, the space has {len(space.params)} parameters")
        entry = {}
        for name, p, t in zip(space.names, space.params, u):
            t = t.detach().reshape(local_view(p.detach()).shape)
            if space.sharded:
                t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
            entry[name] = t
        out[eigenvector_key(i)] = entry
    return out


def save_eigenvectors(vectors, *, space: ParamSpace, folder: str) -> str:
    """Write ``vectors`` (local shards on ``space``; every rank of an FSDP2 group calls it together) as a
    torch.distributed.checkpoint folder that ``dcp.load`` reads at any world size into a model-shaped mapping per
    eigenvector (``eigenvector_state_dict``; ``load_eigenvectors``). Written to ``partial_folder(folder)`` and
    renamed into place by rank 0 once DCP's save has finished on every rank (its metadata is written last, after
    every rank's data): a crash never leaves ``folder`` looking complete. An older ``folder`` is replaced. Every
    rank returns once the folder is in place."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    collective = _collective(space)
    rank = dist.get_rank(space.group) if collective else 0
    partial = partial_folder(folder)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a save a crash cut short
    if collective:
        dist.barrier(group=space.group)  # no rank writes into the partial folder before it is emptied
    state = eigenvector_state_dict(vectors, space=space)
    with warnings.catch_warnings():  # one process: DCP plans locally, and would warn that it does
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=partial, process_group=space.group if collective else None,
                 no_dist=not collective)
    if rank == 0:
        target = os.path.abspath(folder)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(partial, target)
        fd = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)
    if collective:
        dist.barrier(group=space.group)  # every rank returns with the folder in place
    return folder


def saved_eigenvector_count(folder: str) -> int:
    """How many eigenvectors a ``save_eigenvectors`` folder holds (from its DCP metadata alone)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(folder).read_metadata().state_dict_metadata
    count = 0
    while any(k.startswith(eigenvector_key(count) + ".") for k in keys):
        count += 1
    return count


def load_eigenvectors(folder: str, *, space: ParamSpace, count: int | None = None) -> list[list[torch.Tensor]]:
    """The first ``count`` (default all) eigenvectors of a ``save_eigenvectors`` folder as Vectors of this rank's
    local shards on ``space`` (any world size; every rank of a sharded space calls it together), in the dtype
    they were saved in; the space's parameter names must be the saved ones."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.tensor import DTensor

    from .vectors import local_view

    keys = FileSystemReader(folder).read_metadata().state_dict_metadata
    count = saved_eigenvector_count(folder) if count is None else count
    state = {}
    for i in range(count):
        entry = {}
        for name, p in zip(space.names, space.params):
            saved = keys.get(f"{eigenvector_key(i)}.{name}")
            if saved is None:
                raise ValueError(f"{folder}: eigenvector {i} has no parameter {name!r} (saved for another model?)")
            if tuple(saved.size) != tuple(p.shape):
                raise ValueError(f"{folder}: eigenvector {i}'s {name} is {tuple(saved.size)}, the parameter is "
                                 f"{tuple(p.shape)}")
            local = torch.empty(local_view(p.detach()).shape, dtype=saved.properties.dtype, device=space.device)
            entry[name] = (DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride()) if space.sharded else local)
        state[eigenvector_key(i)] = entry
    collective = _collective(space)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, process_group=space.group if collective else None,
                 no_dist=not collective)
    return [[local_view(state[eigenvector_key(i)][name]) for name in space.names] for i in range(count)]


def saved_parameters(folder: str) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes a ``save_eigenvectors`` folder holds (those of its first eigenvector)."""
    from torch.distributed.checkpoint import FileSystemReader

    prefix = eigenvector_key(0) + "."
    keys = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k[len(prefix):]: tuple(v.size) for k, v in keys.items() if k.startswith(prefix)}


def saved_subspace_overlap(first: str, second: str):
    """``subspace_overlap`` of the eigenvectors saved in two ``save_eigenvectors`` folders (e.g. two checkpoints'
    runs), read from disk one parameter tensor at a time: at most (k + k') times the largest parameter tensor is
    in memory, never a whole eigenvector, and no process group is needed. The folders must hold the same parameter
    names and shapes (ValueError naming the first difference)."""
    import warnings

    import numpy as np
    import torch.distributed.checkpoint as dcp

    from .eigen_measures import overlap_of_products

    shapes = [saved_parameters(folder) for folder in (first, second)]
    if shapes[0] != shapes[1]:
        name = next(n for n in sorted(set(shapes[0]) | set(shapes[1])) if shapes[0].get(n) != shapes[1].get(n))
        raise ValueError(f"the eigenvectors in {first!r} and {second!r} are of different parameters: {name!r} is "
                         f"{shapes[0].get(name, 'missing')} in the first and {shapes[1].get(name, 'missing')} in the "
                         f"second")
    counts = [saved_eigenvector_count(folder) for folder in (first, second)]
    cross = np.zeros((counts[0], counts[1]))
    grams = [np.zeros((c, c)) for c in counts]
    for name in shapes[0]:
        parts = []
        for folder, count in zip((first, second), counts):
            state = {f"{eigenvector_key(i)}.{name}": torch.empty(shapes[0][name], dtype=torch.float64)
                     for i in range(count)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=folder, no_dist=True)
            parts.append(torch.stack([t.reshape(-1) for t in state.values()]))
        cross += (parts[0] @ parts[1].T).numpy()
        for gram, part in zip(grams, parts):
            gram += (part @ part.T).numpy()
    return overlap_of_products(cross, grams[0], grams[1])
