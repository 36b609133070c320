"""Lanczos checkpoints: each rank's local shards of the state, complete only once a marker is written.

Layout of one probe's folder: ``step-000012/rank-00000.pt`` (one per rank), ``step-000012/meta.json`` and
``step-000012/COMPLETE``. Every file goes to a temporary name and is renamed into place; rank 0 writes the
marker after a barrier, once every rank's file is in place, and only then deletes older steps. A folder without
the marker (a crash mid-save) is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from .files import atomic_text, atomic_write
from .lanczos import LanczosState

MARKER = "COMPLETE"


def _step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:06d}")


def save_lanczos_state(state: LanczosState, *, folder: str, rank: int, group=None, meta: dict) -> str:
    """Write this rank's shards of ``state``; collective over ``group`` (all ranks call it together)."""
    step = state.steps_done
    target = _step_dir(folder, step)
    os.makedirs(target, exist_ok=True)
    payload = {"alphas": list(state.alphas), "betas": list(state.betas), "stopped": state.stopped,
               "basis": [t.detach().to("cpu", copy=True) for t in state.basis], "shapes": [tuple(s) for s in state.shapes]}
    atomic_write(os.path.join(target, f"rank-{rank:05d}.pt"), lambda tmp: torch.save(payload, tmp))
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)
    if rank == 0:
        atomic_text(os.path.join(target, "meta.json"), json.dumps({**meta, "step": step}, sort_keys=True), sync=True)
        atomic_text(os.path.join(target, MARKER), "ok\n", sync=True)
        for name in os.listdir(folder):
            if name.startswith("step-") and name != os.path.basename(target):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return target


def latest_complete_step(folder: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest complete checkpoint in ``folder``, or None."""
    if not os.path.isdir(folder):
        return None
    steps = sorted((name for name in os.listdir(folder) if name.startswith("step-")), reverse=True)
    for name in steps:
        path = os.path.join(folder, name)
        if os.path.exists(os.path.join(path, MARKER)):
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            return meta["step"], meta
    return None


def load_lanczos_state(folder: str, *, step: int, rank: int, device: torch.device) -> LanczosState:
    payload = torch.load(os.path.join(_step_dir(folder, step), f"rank-{rank:05d}.pt"), map_location="cpu")
    return LanczosState.from_basis(payload["basis"], device=device,
                                   shapes=[torch.Size(s) for s in payload["shapes"]], alphas=payload["alphas"],
                                   betas=payload["betas"], stopped=payload["stopped"])
