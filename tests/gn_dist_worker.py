"""A rank of the 2-process FSDP2 Gauss-Newton test (torch.multiprocessing, gloo, no Ray): G v on the shards of a
masked, padded analysis set whose ranks count different numbers of tokens, saved with the shards' offsets."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from helpers import make_batches, make_tiny_model
from hessian_core import GaussNewtonOperator, ParamSpace, evaluate_loss, probe_vector, shard_model

EPS = 1e-4  # summation-order differences between layouts are divided by 2 eps; the truncation error is shared


def masked_set(world: int) -> list[dict]:
    """Two batches of 2 x world rows with padding and -100 labels, rank r's rows r, r + world, ...: the ranks'
    counted tokens differ, so a per-rank mean instead of the global one would show."""
    out = []
    for k, ids in enumerate(make_batches(num_batches=2, batch_size=2 * world, seed=7)):
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # rank 1's first row is 5 tokens long, padded
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.clone()
        labels[0, :3] = -100  # rank 0's first row has a 3-token prompt
        if k == 1:
            labels[:, :6] = -100  # the second batch counts only the last 2 tokens of each row
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def rank_slice(batches: list[dict], rank: int, world: int) -> list[dict]:
    return [{key: t[rank::world] for key, t in b.items()} for b in batches]


def compute(model, batches) -> dict:
    space = ParamSpace(model)
    v = probe_vector(space, seed=11, probe_index=0, dtype=torch.float64)
    op = GaussNewtonOperator(model, batches, eps=EPS, space=space, chunk_tokens=5)
    evaluate_loss(model, batches, space=space)  # a bare forward first: the root is left gathered, G v reshards it
    before = [t.clone() for t in space.local_params()]
    gv = op.matvec(v)
    restored = all(torch.equal(a, b) for a, b in zip(before, space.local_params()))
    return {"shards": [(s.name, s.flat_start) for s in space.shards], "gv": [t.reshape(-1).clone() for t in gv],
            "v": [t.reshape(-1).clone() for t in v], "restored": restored, "total_tokens": op.loss.total_tokens}


def run_rank(rank: int, world: int, port: int, archs: tuple[str, ...], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for arch in archs:  # one process group for every architecture: the spawn is most of the test's time
            model = shard_model(make_tiny_model(arch), mesh=mesh)
            torch.save(compute(model, rank_slice(masked_set(world), rank, world)), f"{out_dir}/{arch}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_fisher_rank(rank: int, world: int, port: int, arch: str, out_dir: str) -> None:
    """The empirical Fisher's F v on the shards (ranks own different sequences and token counts)."""
    from hessian_core import EmpiricalFisherOperator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        model = shard_model(make_tiny_model(arch), mesh=init_device_mesh("cpu", (world,)))
        space = ParamSpace(model)
        op = EmpiricalFisherOperator(model, rank_slice(masked_set(world), rank, world), space=space)
        fv = op.matvec(probe_vector(space, seed=11, probe_index=0, dtype=torch.float64))
        torch.save({"shards": [(s.name, s.flat_start) for s in space.shards], "sequences": op.sequences,
                    "fv": [t.reshape(-1).clone() for t in fv]}, f"{out_dir}/fisher-rank{rank}.pt")
    finally:
        dist.destroy_process_group()
