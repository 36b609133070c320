"""Mixed precision (float32 master shards, bfloat16 compute) and activation checkpointing.

- a 2-rank gloo group with compute_dtype=bfloat16 runs calibration and SLQ through actors.worker.Worker: FSDP
  computes with bfloat16 parameters while the shards and gradients stay float32, and lambda_max agrees with
  a plain float32 rank;
- activation checkpointing leaves float64 Lanczos coefficients bitwise unchanged and does recompute blocks;
- eps=auto for float32 master / bfloat16 compute lands within 3x of the best step of a sweep against the
  dense float64 Hessian;
- the error bars of lambda_max and lambda_min (Ritz residual + Weyl bound from the FD HVP's relative error)
  contain the dense Hessian's true extremes in float64, float32 and float32/bfloat16 (the bound's direction
  factor was fitted on this model: see hessian_core/error_bars.py), and are narrower than half the spectrum.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.worker import Worker, free_port
from helpers import dense_hessian, flatten, make_batches, make_tiny_model, rel
from hessian_core import (FiniteDifferenceHVP, ParamSpace, calibrate_eps, lanczos, probe_vector, ritz_rule,
                          extreme_eigenvalues, shard_model)
from hessian_core.error_bars import extreme_error_bars
from hessian_core.models import checkpoint_blocks
from hessian_core.precision import compute_dtype_of, mixed_precision_policy, single_process_group
from precision_ranks import run_rank, slq_on_worker, tiny_spec


@pytest.mark.slow
def test_two_rank_group_computes_in_bfloat16_on_float32_shards(tmp_path):
    world, steps = 2, 8
    batches = torch.stack(make_batches(num_batches=2, batch_size=4, seed=7))
    mp.spawn(run_rank, args=(world, free_port(), str(tmp_path), batches, steps), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:
        assert r["sharded"]
        assert r["compute_dtypes"] == ["torch.bfloat16"]  # what the modules' forwards saw
        assert r["shard_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]
        assert r["choice"]["compute_dtype"] == "bfloat16" and r["choice"]["roundoff_source"] == "measured"
        assert r["choice"]["source"] == "auto" and r["choice"]["reliable"]
        assert len(r["alphas"]) == steps and np.isfinite(r["alphas"]).all() and np.isfinite(r["betas"]).all()
    assert ranks[0]["alphas"] == ranks[1]["alphas"]  # one group, one answer

    # the same model on one plain float32 rank at the same step: only bfloat16 round-off separates the two
    # operators (at this large step both carry the same truncation error, which on this random-init model is
    # large along its top eigenvector: see docs/precision.md, "Error bars")
    plain = Worker(rank=0, world_size=1, use_gpu=False)
    plain.setup(index=0, rendezvous=None, spec=tiny_spec(dtype="float32"), batches=batches, timeout_seconds=60)
    reference = slq_on_worker(plain, steps=steps, eps=ranks[0]["choice"]["eps"])
    assert reference["compute_dtypes"] == ["torch.float32"] and not reference["sharded"]
    top = ritz_rule(ranks[0]["alphas"], ranks[0]["betas"]).values[-1]
    top_ref = ritz_rule(reference["alphas"], reference["betas"]).values[-1]
    assert abs(top - top_ref) <= 3 * ranks[0]["choice"]["relative_error"] * abs(top_ref), (top, top_ref)


def test_activation_checkpointing_is_bitwise_neutral_in_float64_and_recomputes():
    batches = make_batches(num_batches=2, batch_size=2, seq_len=8, seed=7)
    results = []
    for checkpointing in (False, True):
        model = make_tiny_model("llama", layers=2, train_steps=5)
        if checkpointing:
            assert checkpoint_blocks(model) == 2
        calls = [0]
        # a pre-hook: recomputation stops right after the last saved tensor, before forward hooks would run
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        space = ParamSpace(model)
        op = FiniteDifferenceHVP(model, batches, eps=1e-4, space=space)
        v = probe_vector(space, seed=1, probe_index=0, dtype=torch.float64)
        out = lanczos(op.matvec, v, space=space, steps=5, reorth="full", vector_dtype=torch.float64)
        results.append((out.alphas, out.betas, calls[0]))
    (a0, b0, calls_plain), (a1, b1, calls_ckpt) = results
    assert torch.equal(a0, a1) and torch.equal(b0, b1)
    assert calls_ckpt == 2 * calls_plain  # every block forward ran again in its backward


@pytest.fixture(scope="module")
def process_group():
    """A 1-rank gloo group for the mixed-precision (FSDP2 on a 1-rank mesh) cases, destroyed afterwards."""
    created = single_process_group()
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dense_case():
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    reference = make_tiny_model("gpt_neox")
    return batches, dense_hessian(reference, batches)


def _model(precision: str):
    if precision == "float64":
        return make_tiny_model("gpt_neox"), None
    model = make_tiny_model("gpt_neox", dtype=torch.float32)
    if precision == "mixed":
        from torch.distributed.device_mesh import init_device_mesh

        shard_model(model, mesh=init_device_mesh("cpu", (1,)),
                    mp_policy=mixed_precision_policy(torch.float32, torch.bfloat16))
        assert compute_dtype_of(model) == torch.bfloat16
        return model, torch.bfloat16
    return model, None


@pytest.mark.slow
def test_auto_eps_for_mixed_precision_within_3x_of_the_sweep_minimum(process_group, dense_case):
    batches, hessian = dense_case
    model, compute = _model("mixed")
    space = ParamSpace(model)
    v = probe_vector(space, seed=0, probe_index=0, dtype=torch.float32)
    reference = hessian @ flatten(v)
    op = FiniteDifferenceHVP(model, batches, eps=1.0, space=space)
    grid = np.logspace(-3, 1, 17)
    errors = []
    for eps in grid:
        errors.append(rel(flatten(op.with_eps(float(eps)).matvec(v)), reference))
    best = grid[int(np.argmin(errors))]
    choice = calibrate_eps(op, v, compute_dtype=compute)
    assert choice.source == "auto" and choice.roundoff_source == "measured"
    assert best / 3 <= choice.eps <= best * 3, (choice.eps, best, errors)
    measured = rel(flatten(op.with_eps(choice.eps).matvec(v)), reference)
    assert measured / 3 <= choice.relative_error <= measured * 3, (choice.relative_error, measured)
    # the float32 eps_mach would have put the step deep in bfloat16's round-off
    plain = calibrate_eps(op, v)
    assert plain.eps < best / 10


_bars: dict[str, tuple] = {}


def _error_bars(precision: str, batches):
    """(bars, relative error) of a 2-probe, 60-step SLQ run at the auto eps, computed once per precision."""
    if precision not in _bars:
        model, compute = _model(precision)
        space = ParamSpace(model)
        op = FiniteDifferenceHVP(model, batches, eps=1.0, space=space)
        choice = calibrate_eps(op, probe_vector(space, seed=0, probe_index=0, dtype=torch.float64),
                               compute_dtype=compute)
        op = op.with_eps(choice.eps)
        rules = [ritz_rule(r.alphas, r.betas) for r in
                 (lanczos(op.matvec, probe_vector(space, seed=0, probe_index=k, dtype=torch.float64), space=space,
                          steps=60, reorth="full", vector_dtype=torch.float64) for k in range(2))]
        ext = extreme_eigenvalues(rules)
        summary = {"lambda_max": ext.lambda_max, "lambda_max_residual": ext.lambda_max_residual,
                   "lambda_min": ext.lambda_min, "lambda_min_residual": ext.lambda_min_residual}
        _bars[precision] = extreme_error_bars(summary, hvp_relative_error=choice.relative_error)
    return _bars[precision]


@pytest.mark.parametrize("precision,name", [
    ("float64", "lambda_max"), ("float64", "lambda_min"), ("float32", "lambda_max"), ("float32", "lambda_min"),
    ("mixed", "lambda_max"), ("mixed", "lambda_min")])
@pytest.mark.slow
def test_error_bars_contain_the_true_extremes(process_group, dense_case, precision, name):
    batches, hessian = dense_case
    truth = torch.linalg.eigvalsh(hessian)
    true = float(truth[-1] if name == "lambda_max" else truth[0])
    bar = _error_bars(precision, batches)[name]
    assert abs(bar.value - true) <= bar.total, (precision, name, bar, true)
    assert bar.total < 0.5 * float(truth.abs().max())  # a bar, not the whole spectrum
