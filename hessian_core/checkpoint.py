"""Lanczos checkpoints that any group size can resume, written in the background.

A probe's folder holds each Lanczos vector once, split by the rank that owns each piece, and one small folder per
checkpointed step that names the vectors it needs::

    vectors/q-000012/rank-00000-of-00002.pt   this rank's elements of q_12, keyed by parameter name and offset
    step-000012/meta.json                     alphas, betas, the vector indices and their rows, the writers'
                                              world size, meta
    step-000012/rank-00000-of-00002.done      this rank's vectors for step 12 are in place
    step-000012/COMPLETE                      every rank's are: the step can be resumed

Every file is written to a temporary name and renamed into place. A window of w vectors costs one new vector per
checkpoint, not w. A rank marks its part done; the rank that finds every part done writes ``COMPLETE`` and only
then removes older steps and vectors no complete step needs. A step without the marker (a crash mid-save) is
ignored. ``load_lanczos_state`` gathers each rank's elements from the pieces of whatever world size wrote them,
so a probe checkpointed by W ranks continues on W' ranks with the same vectors bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .files import atomic_text, atomic_write
from .lanczos import LanczosState
from .vectors import ParamSpace

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d{6})$")
_VECTOR = re.compile(r"^q-(\d{6})$")


def _step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:06d}")


def _vector_dir(folder: str, index: int) -> str:
    return os.path.join(folder, "vectors", f"q-{index:06d}")


def _part(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _layout(space: ParamSpace) -> list[tuple[str, int, int]]:
    """(parameter name, start of this rank's piece in the flattened global parameter, its length), in order."""
    return [(s.name, s.flat_start, s.local_numel) for s in space.shards]


def vector_indices(state: LanczosState) -> list[int]:
    """Krylov indices of the kept vectors, oldest first: after s steps the newest is q_s."""
    newest = state.steps_done
    return list(range(newest - len(state.order) + 1, newest + 1))


class CheckpointWriter:
    """One probe's checkpoints from one rank. ``save`` copies what is new into a staging buffer and returns; a
    background thread writes it. The next ``save`` waits only for the previous write."""

    def __init__(self, folder: str, *, space: ParamSpace, rank: int, world_size: int, meta: dict):
        self.folder, self.rank, self.world_size, self.meta = folder, rank, world_size, dict(meta)
        self.layout = _layout(space)
        self.pinned = space.device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._written: set[int] = set()  # vector indices this rank has put on disk

    def save(self, state: LanczosState) -> float:
        """Checkpoint ``state`` (all ranks at the same step); returns the seconds the caller was held."""
        started = time.perf_counter()
        self.wait()
        indices = vector_indices(state)
        new = [(i, row) for i, row in zip(indices, state.order) if i not in self._written]
        staged = []
        for index, row in new:
            buf = torch.empty(state.rows.shape[1], dtype=state.rows.dtype, pin_memory=self.pinned)
            buf.copy_(state.rows[row], non_blocking=self.pinned)
            staged.append((index, buf))
        if self.pinned:
            torch.cuda.current_stream().synchronize()
        scalars = {"alphas": list(state.alphas), "betas": list(state.betas), "stopped": state.stopped,
                   "vectors": indices, "rows": list(state.order), "step": state.steps_done}
        self._pending = self._pool.submit(self._write, staged, scalars)
        self._written.update(i for i, _ in new)
        self._written.intersection_update(indices)
        return time.perf_counter() - started

    def wait(self) -> None:
        """Block until the last save is on disk; re-raises its error (a full disk) in the caller."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _write(self, staged: list[tuple[int, torch.Tensor]], scalars: dict) -> None:
        part = _part(self.rank, self.world_size)
        for index, flat in staged:
            target = _vector_dir(self.folder, index)
            os.makedirs(target, exist_ok=True)
            payload = {"flat": flat, "layout": self.layout}
            atomic_write(os.path.join(target, f"{part}.pt"), lambda tmp: torch.save(payload, tmp))
        step_dir = _step_dir(self.folder, scalars["step"])
        os.makedirs(step_dir, exist_ok=True)
        if self.rank == 0:
            meta = {**self.meta, **scalars, "world_size": self.world_size}
            atomic_text(os.path.join(step_dir, "meta.json"), json.dumps(meta, sort_keys=True), sync=True)
        atomic_text(os.path.join(step_dir, f"{part}.done"), "ok\n", sync=True)
        parts = [_part(r, self.world_size) for r in range(self.world_size)]
        if all(os.path.exists(os.path.join(step_dir, f"{p}.done")) for p in parts):
            # the last rank to finish sees every part (each checks after its own rename) and completes the step
            atomic_text(os.path.join(step_dir, MARKER), "ok\n", sync=True)
            prune(self.folder, keep_step=scalars["step"], keep_vectors=scalars["vectors"])


def prune(folder: str, *, keep_step: int, keep_vectors: list[int]) -> None:
    """Remove every step folder but ``keep_step`` that is older, and vectors below the oldest one it needs."""
    oldest = min(keep_vectors)
    for name in os.listdir(folder):
        m = _STEP.match(name)
        if m and int(m.group(1)) < keep_step:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    vectors = os.path.join(folder, "vectors")
    for name in os.listdir(vectors) if os.path.isdir(vectors) else []:
        m = _VECTOR.match(name)
        if m and int(m.group(1)) < oldest:
            shutil.rmtree(os.path.join(vectors, name), ignore_errors=True)


def discard_after(folder: str, step: int) -> None:
    """Before a probe resumes at ``step`` (0: from scratch): drop newer, incomplete steps and vectors, which a
    crashed writer may have left half done (possibly from a group of another size)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = _STEP.match(name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    vectors = os.path.join(folder, "vectors")
    for name in os.listdir(vectors) if os.path.isdir(vectors) else []:
        m = _VECTOR.match(name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(os.path.join(vectors, name), ignore_errors=True)


def latest_complete_step(folder: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest complete checkpoint in ``folder``, or None."""
    if not folder or not os.path.isdir(folder):
        return None
    steps = sorted((int(m.group(1)) for m in map(_STEP.match, os.listdir(folder)) if m), reverse=True)
    for step in steps:
        path = _step_dir(folder, step)
        if os.path.exists(os.path.join(path, MARKER)):
            with open(os.path.join(path, "meta.json")) as f:
                return step, json.load(f)
    return None


def gather_local(paths: Sequence[str], space: ParamSpace, *, dtype: torch.dtype | None = None,
                 what: str = "a vector") -> torch.Tensor:
    """This rank's elements of saved vectors, cut out of the pieces their writers saved: ``paths`` holds one file
    per writing rank, ``{"flat": [..., numel], "layout": [(parameter name, start, length), ...]}`` (a single
    vector, or rows of vectors ``[rows, numel]``: the leading dimensions are kept). Any world size can read what
    any world size wrote; the bits are the writers'. ``dtype``: the output's (default: the first file's)."""
    wanted = {}
    offset = 0
    for name, start, numel in _layout(space):
        wanted[name] = (start, numel, offset)
        offset += numel
    out = None
    filled = 0
    for path in paths:
        payload = torch.load(path, map_location="cpu", mmap=True)
        flat, src = payload["flat"], 0
        if out is None:
            out = torch.empty((*flat.shape[:-1], offset), dtype=dtype or flat.dtype)
        for name, start, numel in payload["layout"]:
            lo_w, n_w, dst = wanted[name]
            lo, hi = max(start, lo_w), min(start + numel, lo_w + n_w)
            if hi > lo:
                out[..., dst + lo - lo_w: dst + hi - lo_w].copy_(flat[..., src + lo - start: src + hi - start])
                filled += hi - lo
            src += numel
    if filled != offset:
        raise ValueError(f"{what} covers {filled} of this rank's {offset} elements; it was written for another model")
    return out


def _gather_vector(folder: str, index: int, world_size: int, space: ParamSpace, dtype: torch.dtype) -> torch.Tensor:
    """This rank's elements of q_index, cut out of the pieces that the ``world_size`` writers saved."""
    paths = [os.path.join(_vector_dir(folder, index), f"{_part(rank, world_size)}.pt") for rank in range(world_size)]
    return gather_local(paths, space, dtype=dtype, what=f"checkpoint {folder}: vector q_{index}")


def load_lanczos_state(folder: str, *, step: int, space: ParamSpace, device: torch.device | None = None,
                       capacity: int = 0, vectors: str = "device") -> LanczosState:
    """The state saved at ``step``, laid out for this rank of ``space`` whatever world size wrote it, its rows
    on the device or in host memory (``vectors``, whichever the run that wrote it used)."""
    with open(os.path.join(_step_dir(folder, step), "meta.json")) as f:
        meta = json.load(f)
    dtype = None
    basis = []
    for index in meta["vectors"]:
        if dtype is None:
            first = os.path.join(_vector_dir(folder, index), f"{_part(0, meta['world_size'])}.pt")
            dtype = torch.load(first, map_location="cpu", mmap=True)["flat"].dtype
        basis.append(_gather_vector(folder, index, meta["world_size"], space, dtype))
    shapes = [p.shape for p in space.local_params()]
    return LanczosState.from_basis(basis, shapes=shapes, alphas=meta["alphas"], betas=meta["betas"],
                                   stopped=meta["stopped"], capacity=capacity, device=device or space.device,
                                   order=meta.get("rows"), vectors=vectors)


def save_lanczos_state(state: LanczosState, *, folder: str, space: ParamSpace, rank: int = 0, world_size: int = 1,
                       meta: dict | None = None) -> None:
    """Write one checkpoint and wait for it (what the background writer does, in the foreground)."""
    writer = CheckpointWriter(folder, space=space, rank=rank, world_size=world_size, meta=meta or {})
    try:
        writer.save(state)
    finally:
        writer.close()
