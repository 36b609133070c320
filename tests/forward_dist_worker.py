"""A rank of the 2-process FSDP2 check of the forward HVP (torch.multiprocessing, gloo, no Ray): the kept gradient
at theta survives FSDP2's forward and backward (one pass an HVP on shards too), and the result matches one process."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from helpers import make_batches, make_tiny_model
from hessian_core import FiniteDifferenceHVP, ParamSpace, evaluate_loss, probe_vector, shard_model

EPS = 1e-4


def run_rank(rank: int, world: int, port: int, arch: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        model = make_tiny_model(arch)
        batches = [b[rank::world] for b in make_batches(num_batches=2, batch_size=2 * world, seed=7)]
        shard_model(model, mesh=init_device_mesh("cpu", (world,)))
        space = ParamSpace(model)
        v = probe_vector(space, seed=11, probe_index=0, dtype=torch.float64)
        evaluate_loss(model, batches, space=space)  # a bare forward first, as the pipeline's ranks may run one
        op = FiniteDifferenceHVP(model, batches, eps=EPS, scheme="forward", space=space)
        before = [t.clone() for t in space.local_params()]
        hvs = [op.matvec(v) for _ in range(3)]
        torch.save({"shards": [(s.name, s.flat_start) for s in space.shards],
                    "hv": [t.detach().reshape(-1).clone() for t in hvs[-1]],
                    "same": all(torch.equal(a, b) for h in hvs[1:] for a, b in zip(hvs[0], h)),
                    "restored": all(torch.equal(a, b) for a, b in zip(before, space.local_params())),
                    "passes": op.gradient_passes}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
