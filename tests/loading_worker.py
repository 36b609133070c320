"""Ranks of the multi-process loading tests (torch.multiprocessing, gloo on 127.0.0.1, no Ray): each function
runs on every rank and saves what the test compares to ``out_dir/NAME-rank{r}.pt``."""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from helpers import make_batches
from hessian_core import FiniteDifferenceHVP, ParamSpace, lanczos, parameter_blocks, probe_vector, shard_model

# float64: the tiny tied Qwen3 (head_dim 2 under q/k RMSNorm) has a large third derivative, FD error measured
# 3.4e3 * eps^2 (3.4e-3 at eps 1e-3); at 1e-6 truncation is ~3e-9 and round-off ~1e-16/eps stays far below
HVP_EPS = 1e-6


@contextmanager
def process_group(rank: int, world: int, port: int):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        yield
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mesh_for(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,)) if world > 1 else None


def global_batches() -> list[torch.Tensor]:
    """The analysis set of every test here, whatever the number of ranks."""
    return make_batches(num_batches=1, batch_size=4, seed=7)


def rank_batches(rank: int, world: int) -> list[torch.Tensor]:
    return [b[rank::world] for b in global_batches()]


def local_state(model) -> dict:
    """This rank's local parameter shards and buffers, with where each shard starts in its parameter."""
    space = ParamSpace(model)
    return {"params": {s.name: (s.flat_start, t.detach().reshape(-1).clone())
                       for s, t in zip(space.shards, space.local_params())},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def hvp_and_lanczos(model, batches, *, steps: int) -> dict:
    """A float64 probe, its FD HVP and a short Lanczos run on this rank (shards and alpha/beta)."""
    space = ParamSpace(model)
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)
    op = FiniteDifferenceHVP(model, batches, eps=HVP_EPS, space=space)
    hv = op.matvec(v)
    result = lanczos(op.matvec, v, space=space, steps=steps, reorth="full", vector_dtype=torch.float64)
    return {"hv": {s.name: (s.flat_start, t.reshape(-1).clone()) for s, t in zip(space.shards, hv)},
            "alphas": result.alphas, "betas": result.betas, "num_params": space.numel,
            "blocks": list(parameter_blocks(model, space))}


def compare_loads(rank: int, world: int, port: int, path: str, out_dir: str) -> None:
    """Sharded load against full load + fully_shard, in float32 and float64: shards, and (float64) HVP and
    Lanczos coefficients."""
    from hessian_core.models import ModelSpec, load_model
    from hessian_core.models.sharded import load_sharded

    with process_group(rank, world, port):
        out = {}
        for dtype in ("float32", "float64"):
            spec = ModelSpec(path=path, dtype=dtype)
            full = load_model(spec)
            if world > 1:
                shard_model(full, mesh=mesh_for(world))
            sharded = load_sharded(spec, device=torch.device("cpu"), mesh=mesh_for(world))
            out[dtype] = {"full": local_state(full), "sharded": local_state(sharded)}
            if dtype == "float64":
                batches = rank_batches(rank, world)
                out["run_full"] = hvp_and_lanczos(full, batches, steps=5)
                out["run_sharded"] = hvp_and_lanczos(sharded, batches, steps=5)
                out["tied"] = sharded.lm_head.weight is sharded.get_input_embeddings().weight
        torch.save(out, os.path.join(out_dir, f"compare-rank{rank}.pt"))


def finetune_and_save(rank: int, world: int, port: int, hf_config_dir: str, out_dir: str) -> None:
    """A few FSDP2 training steps of a tiny model, then a DCP checkpoint (top-level and nested layouts) and,
    from rank 0, the same weights as a save_pretrained folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from hessian_core import causal_lm_loss

    with process_group(rank, world, port):
        config = AutoConfig.from_pretrained(hf_config_dir)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        shard_model(model, mesh=mesh_for(world))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        data = rank_batches(rank, world)
        model.train()
        for step in range(4):
            opt.zero_grad()
            causal_lm_loss(model, data[step % len(data)]).backward()
            opt.step()
        state = get_model_state_dict(model)
        dcp.save(state, checkpoint_id=os.path.join(out_dir, "dcp-flat"))
        dcp.save({"model": state, "optimizer": opt.state_dict()}, checkpoint_id=os.path.join(out_dir, "dcp-nested"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(full)
            plain.save_pretrained(os.path.join(out_dir, "hf"))


def hvp_of_loads(rank: int, world: int, port: int, specs: dict, out_dir: str) -> None:
    """The float64 FD HVP (and alpha/beta) of each named spec, loaded with ``load_for_rank`` as a worker does."""
    from hessian_core.models import load_for_rank

    with process_group(rank, world, port):
        out = {}
        for name, spec in specs.items():
            model, how = load_for_rank(spec, device=torch.device("cpu"), world_size=world)
            out[name] = {**hvp_and_lanczos(model, rank_batches(rank, world), steps=3), "how": how}
        torch.save(out, os.path.join(out_dir, f"hvp-w{world}-rank{rank}.pt"))


def wrapped_modules(rank: int, world: int, port: int, specs: dict, out_dir: str) -> None:
    """For each named spec loaded with ``load_for_rank``: the modules wrapped by fully_shard, the block names
    and how the model was loaded."""
    from torch.distributed.fsdp import FSDPModule

    from hessian_core.models import load_for_rank

    with process_group(rank, world, port):
        out = {}
        for name, spec in specs.items():
            model, how = load_for_rank(spec, device=torch.device("cpu"), world_size=world)
            out[name] = {"wrapped": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
                         "blocks": list(parameter_blocks(model, ParamSpace(model))), "how": how}
        torch.save(out, os.path.join(out_dir, f"wrapped-rank{rank}.pt"))
