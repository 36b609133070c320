"""Ranks of the 2-process mixed-precision test: actors.worker.Worker without Ray (torch.multiprocessing, gloo)."""

from __future__ import annotations

import torch

from actors.records import CalibrationTask, ProbeTask, as_dict
from actors.worker import Worker
from hessian_core.models import ModelSpec

TINY = {"model_type": "gpt_neox", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
        "hidden_dropout": 0.0, "attention_dropout": 0.0}


def tiny_spec(**kw) -> ModelSpec:
    return ModelSpec(path=None, init="random", config_overrides=dict(TINY), seed=3, **kw)


def _task(eps: float, steps: int) -> ProbeTask:
    return ProbeTask(probe_id=0, seed=0, eps=eps, scheme="central", steps=steps, reorth="full", window=4,
                     vector_dtype="float32", checkpoint_dir=None, checkpoint_every=0)


def slq_on_worker(worker: Worker, *, steps: int, eps: float | None = None) -> dict:
    """What a run does on a group: calibrate eps, then one probe's Lanczos run; records the dtypes the
    model's modules compute with (forward pre-hooks) beside the dtypes of the shards and gradients.
    ``eps``: the probe's step (default: the calibrated one)."""
    compute = set()

    def hook(module, args):
        compute.update(str(p.dtype) for p in module.parameters(recurse=False))

    handles = [m.register_forward_pre_hook(hook) for m in worker.model.modules()]
    choice = as_dict(worker.execute(CalibrationTask(probe=_task(1.0, steps), fixed_eps=None)))
    for h in handles:
        h.remove()
    probe = worker.execute(_task(eps or choice["eps"], steps))
    from hessian_core import accumulate_gradient

    accumulate_gradient(worker.model, worker.batches)
    grads = {str(g.dtype) for g in worker.space.local_grads()}
    worker.model.zero_grad(set_to_none=True)
    return {"choice": choice, "alphas": probe.alphas, "betas": probe.betas, "compute_dtypes": sorted(compute),
            "shard_dtypes": sorted({str(t.dtype) for t in worker.space.local_params()}), "grad_dtypes": sorted(grads),
            "sharded": worker.space.sharded}


def run_rank(rank: int, world: int, port: int, out_dir: str, batches: torch.Tensor, steps: int) -> None:
    torch.set_num_threads(1)
    worker = Worker(rank=rank, world_size=world, use_gpu=False)
    worker.setup(index=0, rendezvous=("127.0.0.1", port), spec=tiny_spec(dtype="float32", compute_dtype="bfloat16"),
                 batches=batches, timeout_seconds=60)
    try:
        torch.save(slq_on_worker(worker, steps=steps), f"{out_dir}/rank{rank}.pt")
    finally:
        worker.shutdown()
