"""The Gauss-Newton operator against the dense float64 G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t / N (jacrev of the
logits, independent of hessian_core) on masked, padded batches: one process, 2 FSDP2 gloo ranks, and Lanczos on G."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from helpers import ARCHS, dense_gauss_newton, flatten, make_tiny_model, rel
from hessian_core import (FiniteDifferenceHVP, GaussNewtonOperator, ParamSpace, block_mask, lanczos,
                          parameter_blocks, probe_vector)
from test_masked_loss import masked_batches

EPS = 1e-5  # J v's truncation error ~ eps^2 |f'''| and round-off ~ 1e-16 |f| / eps are both far below 1e-7


@pytest.fixture(scope="module", params=ARCHS)
def tiny_gn(request):
    """(arch, float64 model, masked batches, dense G)."""
    model = make_tiny_model(request.param)
    batches = masked_batches()
    return request.param, model, batches, dense_gauss_newton(model, batches)


def test_gv_equals_dense_gauss_newton(tiny_gn):
    _, model, batches, dense = tiny_gn
    space = ParamSpace(model)
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)
    op = GaussNewtonOperator(model, batches, eps=EPS, space=space)
    before = [t.clone() for t in space.local_params()]
    gv = op.matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(before, space.local_params()))  # restored bitwise
    assert all(p.grad is None for p in space.params)
    assert op.calls == 1 and op.out_dtype == torch.float64 and gv[0].dtype == torch.float64
    want = dense @ flatten(v)
    assert rel(flatten(gv), want) <= 1e-7
    # not the Hessian: the logits' own curvature is missing (the tiny models' H differs from G by far more)
    hv = FiniteDifferenceHVP(model, batches, eps=1e-4, space=space).matvec(v)
    assert rel(flatten(hv), want) > 1e-2
    # small chunks (not dividing the tokens) give the same product; a block-masked v (None entries) too
    chunked = GaussNewtonOperator(model, batches, eps=EPS, space=space, chunk_tokens=3)
    assert rel(flatten(chunked.matvec(v)), flatten(gv)) <= 1e-12
    idx = next(iter(parameter_blocks(model, space).values()))
    masked = block_mask(v, idx)
    other = op.with_eps(2 * EPS)
    got = flatten(other.matvec(masked))
    assert other.eps == 2 * EPS and op.eps == EPS and op.calls == 2  # copies share the count
    zeroed = flatten([t if t is not None else torch.zeros_like(p) for t, p in zip(masked, space.params)])
    assert rel(got, dense @ zeroed) <= 1e-7


def test_lanczos_on_gauss_newton_stays_in_dense_spectrum(tiny_gn):
    arch, model, batches, dense = tiny_gn
    eigs = torch.linalg.eigvalsh(dense)
    lo, hi = float(eigs[0]), float(eigs[-1])
    assert lo >= -1e-10 * abs(hi)  # PSD, to rounding
    assert hi > 0 and (eigs > 1e-8 * hi).sum() < eigs.numel()  # rank <= counted tokens x (vocab - 1) < P
    space = ParamSpace(model)
    op = GaussNewtonOperator(model, batches, eps=EPS, space=space)
    v = probe_vector(space, seed=4, probe_index=0, kind="gaussian", dtype=torch.float64)
    res = lanczos(op.matvec, v, space=space, steps=120, reorth="full", vector_dtype=torch.float64)
    m = res.steps
    t = torch.diag(res.alphas) + torch.diag(res.betas[:m - 1], 1) + torch.diag(res.betas[:m - 1], -1)
    ritz = torch.linalg.eigvalsh(t)
    scale = abs(hi)
    assert float(ritz[0]) >= lo - 1e-6 * scale and float(ritz[-1]) <= hi + 1e-6 * scale
    assert abs(float(ritz[-1]) - hi) <= 1e-6 * scale, (arch, float(ritz[-1]), hi)
    assert abs(float(ritz[0]) - lo) <= 1e-6 * scale, (arch, float(ritz[0]), lo)
    assert float(ritz[0]) >= -1e-10 * scale


def test_refusals_are_one_line():
    model = make_tiny_model("llama", train_steps=0)
    batches = masked_batches()
    cases = [(dict(eps=1e-4, loss_fn=lambda m, b: m(input_ids=b).logits.sum()), "loss_fn"),
             (dict(eps=0.0), "eps"), (dict(eps=1e-4, chunk_tokens=0), "chunk_tokens"),
             (dict(eps=1e-4, restore="disk"), "restore")]
    for kwargs, word in cases:
        with pytest.raises(ValueError) as e:
            GaussNewtonOperator(model, batches, **kwargs)
        assert word in str(e.value) and "\n" not in str(e.value)
    op = GaussNewtonOperator(model, batches, eps=1e-4)
    with pytest.raises(ValueError, match="tensors"):
        op.matvec(op.space.zeros()[:-1])


@pytest.mark.slow
def test_two_rank_fsdp2_gauss_newton(tmp_path):
    from actors.worker import free_port
    from gn_dist_worker import compute, masked_set, rank_slice, run_rank

    world, archs = 2, ("gpt_neox", "llama")
    mp.spawn(run_rank, args=(world, free_port(), archs, str(tmp_path)), nprocs=world, join=True)
    full = masked_set(world)
    for arch in archs:
        ranks = [torch.load(tmp_path / f"{arch}-rank{r}.pt") for r in range(world)]
        model = make_tiny_model(arch)
        single = compute(model, rank_slice(full, 0, 1))
        pieces = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
        for r in ranks:
            assert r["restored"] and r["total_tokens"] == single["total_tokens"]
            for (name, start), t in zip(r["shards"], r["gv"]):
                pieces[name][start:start + t.numel()] = t
        sharded = torch.cat(list(pieces.values()))
        assert rel(sharded, torch.cat(single["gv"])) <= 1e-7, arch
        assert rel(sharded, dense_gauss_newton(model, full) @ torch.cat(single["v"])) <= 1e-7, arch


@pytest.mark.parametrize("dtype, eps, bound", [(torch.float32, 1e-2, 1e-3), (torch.bfloat16, 1e-1, 0.3)])
def test_low_precision_models(dtype, eps, bound):
    """float32 (the buffer in place) and bfloat16 (J v and H_out in float32, w cast back for the backward, the
    gradients summed into a float32 output) against the dense G of the same rounded parameters in float64; in
    bfloat16 a step of eps v is mostly lost to the parameters' rounding (as for the FD HVP), hence the loose bound."""
    model = make_tiny_model("llama", dtype=dtype)
    reference = make_tiny_model("llama", dtype=dtype).to(torch.float64)
    batches = masked_batches()
    space = ParamSpace(model)
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float32)
    before = [t.clone() for t in space.local_params()]
    op = GaussNewtonOperator(model, batches, eps=eps, space=space)
    gv = op.matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(before, space.local_params()))
    assert op.out_dtype == torch.float32 and all(t.dtype == torch.float32 for t in gv)
    assert rel(flatten(gv), dense_gauss_newton(reference, batches) @ flatten(v)) <= bound
