"""A rank of the 2-process FSDP2 eigenpairs test (torch.multiprocessing, gloo, no Ray): thick-restart Lanczos on
the shards, a checkpoint after the second restart, and the measurements that reduce over the group."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from helpers import make_batches, make_tiny_model
from hessian_core import (FiniteDifferenceHVP, ParamSpace, eigen_mass, gradient_fraction, landscape_1d,
                          load_eigenvectors, save_eigen_state, save_eigenvectors, shard_model, thick_restart_lanczos)

ARCH = "llama"
EPS = 1e-3  # as tests/dist_worker.py: summation-order differences between layouts are divided by 2 eps
OPTIONS = dict(k=5, which="LA", tol=1e-8, max_hvps=400, seed=3)
LANDSCAPE_TS = (-0.1, 0.0, 0.1)


def batches_for(rank: int, world: int) -> list[torch.Tensor]:
    return [b[rank::world] for b in make_batches(num_batches=2, batch_size=4, seed=7)]


def solve(model, batches, *, state_folder: str | None = None, rank: int = 0, world: int = 1, state=None):
    """(result, space): the eigenpairs of the FD operator at EPS, saving the state after restart 2 when asked."""
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=EPS, space=space)

    def save(s):
        if state_folder is not None and s.restarts == 2:
            save_eigen_state(s, folder=state_folder, space=space, rank=rank, world_size=world)

    return thick_restart_lanczos(op.matvec, space=space, state=state, on_restart=save, **OPTIONS), space


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        model = make_tiny_model(ARCH)
        shard_model(model, mesh=init_device_mesh("cpu", (world,)))
        batches = batches_for(rank, world)
        result, space = solve(model, batches, state_folder=f"{out_dir}/state", rank=rank, world=world)
        before = [t.clone() for t in space.local_params()]
        landscape = landscape_1d(model, batches, result.eigenvectors[0], LANDSCAPE_TS)
        fraction = gradient_fraction(model, batches, result)
        restored = all(torch.equal(a, b) for a, b in zip(before, space.local_params()))
        # the eigenvectors saved sharded (DTensors of the local shards), and read back on the same 2 ranks
        save_eigenvectors(result.eigenvectors, space=space, folder=f"{out_dir}/vectors")
        loaded = load_eigenvectors(f"{out_dir}/vectors", space=space)
        reloaded = len(loaded) == 5 and all(torch.equal(a, b) for u, w in zip(result.eigenvectors, loaded)
                                            for a, b in zip(u, w))
        torch.save({"shards": [(s.name, s.flat_start) for s in space.shards],
                    "vectors": [[t.detach().reshape(-1).clone() for t in u] for u in result.eigenvectors],
                    "eigenvalues": result.eigenvalues, "residuals": result.residuals, "converged": result.converged,
                    "hvps": result.hvps, "mass": eigen_mass(result, model=model).per_block, "landscape": landscape,
                    "fraction": fraction.fraction, "restored": restored, "reloaded": reloaded},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
