"""A rank of the 2-process FSDP2 test of hessian_core.analyze (torch.multiprocessing, gloo on 127.0.0.1)."""

from __future__ import annotations

import copy
import datetime

import torch
import torch.distributed as dist

from helpers import make_batches, make_tiny_model
from hessian_core import analyze, shard_model
from hessian_core.vectors import all_reduce_sum
from test_api import prepare_training, train_step
from test_masked_loss import masked_batches


def held_after_reduce(calls: int) -> int:
    """How many of ``calls`` reductions returned while gloo's worker thread still held the reduced tensor."""
    held = 0
    for k in range(calls):
        scalars = torch.tensor([float(k), 1.0], dtype=torch.float64)
        baseline = scalars._use_count()
        all_reduce_sum(scalars, dist.group.WORLD)
        held += scalars._use_count() != baseline or scalars[1].item() != dist.get_world_size()
    return held


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        base = make_tiny_model("gpt_neox")  # dropout 0.1
        with_analysis, without = shard_model(copy.deepcopy(base), mesh=mesh), shard_model(copy.deepcopy(base), mesh=mesh)
        batches = [b[rank::world] for b in make_batches(num_batches=3, batch_size=2 * world, seed=3)]
        opt_a, opt_b = prepare_training(with_analysis, batches), prepare_training(without, batches)
        grad_ids = [id(p.grad) for p in with_analysis.parameters()]
        torch.manual_seed(100 + rank)
        state = torch.get_rng_state()
        result = analyze(with_analysis, batches[1:], probes=2, steps=4, eps="auto", blocks=True)
        untouched = (with_analysis.training and all(m.training for m in with_analysis.modules())
                     and [id(p.grad) for p in with_analysis.parameters()] == grad_ids)
        loss_a, grads_a = train_step(with_analysis, opt_a, batches[2])
        torch.set_rng_state(state)
        loss_b, grads_b = train_step(without, opt_b, batches[2])
        same = (torch.equal(loss_a, loss_b)
                and all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(grads_a, grads_b))
                and all(torch.equal(a.to_local(), b.to_local())
                        for a, b in zip(with_analysis.parameters(), without.parameters())))
        # masked batches whose two halves count different numbers of tokens: the loss is the global token mean
        masked = [{k: t[rank::world] for k, t in b.items()} for b in masked_batches()]
        plain = shard_model(copy.deepcopy(base), mesh=mesh)
        spectrum = analyze(plain, masked, probes=1, steps=4, eps=1e-4, reorth="full")
        torch.save({"untouched": untouched, "same": same, "lambda_max": result.lambda_max,
                    "num_params": result.num_params, "masked_alphas": spectrum.lanczos[0].alphas,
                    "masked_loss": spectrum.loss, "held_after_reduce": held_after_reduce(200)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
