"""FSDP2 over 2 gloo ranks gives the same probes, HVPs, Lanczos coefficients and block metrics as one process."""


import pytest
import torch
import torch.multiprocessing as mp

from actors.worker import free_port
from dist_worker import compute, run_rank
from helpers import make_batches, make_tiny_model


def assemble(rank_results, name_sizes):
    """Global flat tensors from each rank's local shards and their flat offsets."""
    out = {}
    for key in ("v", "hv"):
        tensors = {name: torch.zeros(size, dtype=torch.float64) for name, size in name_sizes}
        for res in rank_results:
            for (name, start), t in zip(res["shards"], res[key]):
                tensors[name][start:start + t.numel()] = t
        out[key] = torch.cat([tensors[name] for name, _ in name_sizes])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_two_rank_fsdp2_matches_single_process(arch, tmp_path):
    world, steps = 2, 6
    mp.spawn(run_rank, args=(world, free_port(), arch, str(tmp_path), steps), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    model = make_tiny_model(arch)
    single = compute(model, make_batches(num_batches=2, batch_size=2 * world, seed=7), steps=steps)
    name_sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    sharded = assemble(ranks, name_sizes)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert all(r["restored"] for r in ranks) and single["restored"]
    for r in ranks:  # the exact HVP refuses a sharded model in one line instead of failing inside torch
        assert r["exact_refusal"] and "unsharded" in r["exact_refusal"] and "\n" not in r["exact_refusal"]
    assert torch.equal(sharded["v"], torch.cat(single["v"]))  # the same probe whatever the sharding
    assert rel(sharded["hv"], torch.cat(single["hv"])) <= 1e-10
    assert all(abs(r["loss"] - single["loss"]) <= 1e-12 * abs(single["loss"]) for r in ranks)
    for r in ranks:
        assert rel(r["alphas"], single["alphas"]) <= 1e-10
        assert rel(r["betas"], single["betas"]) <= 1e-10
        names, rel_err, cos, whole = r["blocks"]
        assert names == single["blocks"][0]
        assert torch.allclose(torch.tensor(rel_err), torch.tensor(single["blocks"][1]), rtol=1e-8, atol=0)
        assert torch.allclose(torch.tensor(cos), torch.tensor(single["blocks"][2]), rtol=1e-8, atol=1e-12)
        assert abs(whole - single["blocks"][3]) <= 1e-8 * whole
