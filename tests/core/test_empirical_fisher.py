"""The empirical Fisher operator against the dense (1/n) sum_i g_i g_i^T built from per-sequence gradients of an
independent token-mean loss (test_masked_loss.reference_loss), on masked, padded batches; and on 2 FSDP2 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from helpers import ARCHS, flatten, make_tiny_model, rel
from hessian_core import EmpiricalFisherOperator, ParamSpace, block_mask, parameter_blocks, probe_vector
from test_masked_loss import masked_batches, reference_loss


def dense_empirical_fisher(model, batches) -> torch.Tensor:
    grads = []
    for b in batches:
        b = {"input_ids": b} if isinstance(b, torch.Tensor) else b
        for i in range(b["input_ids"].shape[0]):
            row = {k: t[i:i + 1] for k, t in b.items()}
            row.setdefault("labels", row["input_ids"])
            keep = row["labels"][:, 1:] != -100
            if "attention_mask" in row:
                keep &= row["attention_mask"][:, 1:] == 1
            if not keep.any():
                continue
            g = torch.autograd.grad(reference_loss(model, [row]), list(model.parameters()))
            grads.append(torch.cat([t.reshape(-1) for t in g]))
    stacked = torch.stack(grads)
    return stacked.T @ stacked / len(grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_product_equals_dense(arch):
    model = make_tiny_model(arch)
    batches = masked_batches()
    batches[1]["labels"][1, :] = -100  # a sequence with no counted token: not one of the n
    space = ParamSpace(model)
    op = EmpiricalFisherOperator(model, batches, space=space)
    assert op.sequences == 3
    dense = dense_empirical_fisher(model, batches)
    v = probe_vector(space, seed=2, probe_index=0, dtype=torch.float64)
    fv = op.matvec(v)
    assert rel(flatten(fv), dense @ flatten(v)) <= 1e-10 and op.calls == 1
    assert all(p.grad is None for p in space.params)
    idx = next(iter(parameter_blocks(model, space).values()))
    masked = block_mask(v, idx)
    zeroed = flatten([t if t is not None else torch.zeros_like(p) for t, p in zip(masked, space.params)])
    assert rel(flatten(op.matvec(masked)), dense @ zeroed) <= 1e-10
    eigs = torch.linalg.eigvalsh(dense)
    assert eigs[0] >= -1e-12 * eigs[-1] and (eigs > 1e-10 * eigs[-1]).sum() == 3  # PSD, rank n


@pytest.mark.slow
def test_two_rank_fsdp2_fisher(tmp_path):
    from actors.worker import free_port
    from gn_dist_worker import masked_set, run_fisher_rank

    world, arch = 2, "qwen2"
    mp.spawn(run_fisher_rank, args=(world, free_port(), arch, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"fisher-rank{r}.pt") for r in range(world)]
    model = make_tiny_model(arch)
    full = masked_set(world)
    pieces = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
    for r in ranks:
        assert r["sequences"] == 7  # 8 rows, one padded where all its labels are -100; rank 1 owns 3
        for (name, start), t in zip(r["shards"], r["fv"]):
            pieces[name][start:start + t.numel()] = t
    v = probe_vector(ParamSpace(model), seed=11, probe_index=0, dtype=torch.float64)
    assert rel(torch.cat(list(pieces.values())), dense_empirical_fisher(model, full) @ flatten(v)) <= 1e-10
