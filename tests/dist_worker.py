"""A rank of the 2-process FSDP2 test (torch.multiprocessing, gloo, no Ray): runs the core on shards, saves them."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from helpers import make_batches, make_tiny_model
from hessian_core import (ExactHVPUnavailable, FiniteDifferenceHVP, evaluate_loss, exact_hvp, ParamSpace, block_diagonal_metrics, lanczos, parameter_blocks,
                          probe_vector, shard_model)


def compute(model, batches, *, steps: int) -> dict:
    space = ParamSpace(model)
    v = probe_vector(space, seed=11, probe_index=0, dtype=torch.float64)
    # a larger step than the accuracy optimum: both runs share its truncation error, and the summation-order
    # differences between one process and two ranks are divided by 2 eps
    op = FiniteDifferenceHVP(model, batches, eps=1e-3, space=space)
    # a forward without backward first: FSDP2 would leave the root gathered and hide the in-place perturbation
    loss = evaluate_loss(model, batches, space=space)
    before = [t.clone() for t in space.local_params()]
    hv = op.matvec(v)
    restored = all(torch.equal(a, b) for a, b in zip(before, space.local_params()))
    result = lanczos(op.matvec, v, space=space, steps=steps, reorth="window", window=4, vector_dtype=torch.float64)
    blocks = block_diagonal_metrics(op.matvec, v, space=space, blocks=parameter_blocks(model, space))
    return {
        "shards": [(s.name, s.flat_start) for s in space.shards],
        "v": [t.detach().reshape(-1).clone() for t in v],
        "hv": [t.detach().reshape(-1).clone() for t in hv],
        "loss": loss, "alphas": result.alphas, "betas": result.betas, "restored": restored,
        "blocks": (blocks.blocks, blocks.rel_error, blocks.cosine, blocks.whole_rel_error),
    }


def run_rank(rank: int, world: int, port: int, arch: str, out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        model = make_tiny_model(arch)
        batches = [b[rank::world] for b in make_batches(num_batches=2, batch_size=2 * world, seed=7)]
        shard_model(model, mesh=init_device_mesh("cpu", (world,)))
        result = compute(model, batches, steps=steps)
        try:
            exact_hvp(model, batches, v=[torch.zeros_like(t) for t in ParamSpace(model).local_params()])
            result["exact_refusal"] = None
        except ExactHVPUnavailable as e:
            result["exact_refusal"] = str(e)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
