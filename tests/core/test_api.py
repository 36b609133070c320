"""hessian_core.analyze: leaves a training step bitwise untouched, and measures the dense Hessian's spectrum."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from helpers import dense_hessian, make_batches, make_tiny_model
from hessian_core import analyze, append_row, causal_lm_loss


def train_step(model, opt, batch):
    """Forward, backward into the accumulated gradients, optimizer step; returns (loss, grads before the step)."""
    loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


def prepare_training(model, batches):
    """Train mode, one optimizer step (so Adam has state), then one accumulated micro-batch of gradients."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    causal_lm_loss(model, batches[0]).backward()
    opt.step()
    opt.zero_grad()
    torch.manual_seed(6)
    causal_lm_loss(model, batches[1]).backward()  # accumulated, not yet stepped
    return opt


@pytest.mark.slow
def test_a_training_step_after_analyze_is_bitwise_the_step_without_it():
    batches = make_batches(num_batches=3, batch_size=2, seed=3)
    base = make_tiny_model("gpt_neox")  # hidden/attention dropout 0.1: the step consumes the RNG
    frozen = "gpt_neox.embed_in.weight"
    dict(base.named_parameters())[frozen].requires_grad_(False)
    with_analysis, without = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = prepare_training(with_analysis, batches), prepare_training(without, batches)
    with_analysis.gpt_neox.layers[0].eval()  # a mixed mode must come back mixed
    without.gpt_neox.layers[0].eval()
    modes = [m.training for m in with_analysis.modules()]
    grad_ids = [id(p.grad) for p in with_analysis.parameters()]
    torch.manual_seed(9)
    random.seed(1)
    np.random.seed(2)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    result = analyze(with_analysis, [b for b in batches[1:]], probes=2, steps=4, eps="auto", blocks=True)
    assert with_analysis.training and [m.training for m in with_analysis.modules()] == modes
    assert [id(p.grad) for p in with_analysis.parameters()] == grad_ids
    assert not dict(with_analysis.named_parameters())[frozen].requires_grad
    assert frozen not in result.param_names and result.num_params == sum(
        p.numel() for p in with_analysis.parameters() if p.requires_grad)
    assert (random.random(), np.random.rand()) == (random.Random(1).random(), np.random.RandomState(2).rand())
    loss_a, grads_a = train_step(with_analysis, opt_a, batches[2])

    torch.set_rng_state(state[0])
    loss_b, grads_b = train_step(without, opt_b, batches[2])
    assert torch.equal(loss_a, loss_b)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(with_analysis.parameters(), without.parameters()))


@pytest.fixture(scope="module")
def llama_dense():
    model = make_tiny_model("llama")
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    return model, batches, dense_hessian(model, batches)


@pytest.mark.slow
def test_analyze_finds_the_dense_extremes_and_respects_filters_and_loss_fn(llama_dense):
    model, batches, hessian = llama_dense
    eig = torch.linalg.eigvalsh(hessian)
    result = analyze(model, batches, probes=1, steps=40, eps=1e-6, reorth="full")
    assert abs(result.lambda_max - float(eig[-1])) <= 1e-7 * float(eig.abs().max())
    assert abs(result.lambda_min - float(eig[0])) <= 1e-7 * float(eig.abs().max())
    assert result.num_params == hessian.shape[0] and np.isclose(result.ritz[0].weights.sum(), 1.0)
    table = result.to_arrow()
    assert table.column_names == ["probe_id", "value", "weight", "residual"] and table.num_rows == 40

    doubled = analyze(model, batches, probes=1, steps=40, eps=1e-6, reorth="full",
                      loss_fn=lambda m, b: 2.0 * causal_lm_loss(m, b))
    assert abs(doubled.lambda_max - 2 * float(eig[-1])) <= 1e-7 * float(eig.abs().max())

    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    starts = np.cumsum([0] + sizes)
    pick = [i for i, n in enumerate(names) if n == "lm_head.weight"]
    sel = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in pick])
    sub_eig = torch.linalg.eigvalsh(hessian[sel][:, sel])
    head = analyze(model, batches, probes=1, steps=40, eps=1e-6, reorth="full",
                   param_filter=lambda name, p: name == "lm_head.weight")
    assert head.param_names == ["lm_head.weight"]
    assert abs(head.lambda_max - float(sub_eig[-1])) <= 1e-7 * float(sub_eig.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_float64_llama_as_transformers_builds_it_is_measured_in_float64_and_given_back_unchanged(llama_dense, attn):
    """transformers' RMSNorm and eager softmax compute in float32: analyze switches them to float64 while it
    measures (as the CLI does for good), and puts the user's forwards back."""
    model, batches, hessian = llama_dense
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    plain = copy.deepcopy(model)
    for module in plain.modules():
        module.__dict__.pop("forward", None)  # undo make_tiny_model's float64_rmsnorm: the model as built
    plain.set_attn_implementation(attn)
    result = analyze(plain, batches, probes=1, steps=40, eps="auto", reorth="full")
    assert abs(result.lambda_max - top) <= 1e-6 * abs(top)
    assert not any("forward" in module.__dict__ for module in plain.modules())


def test_the_cli_model_preparation_makes_the_same_float64_fixes():
    """hessian_core.models.prepare_for_analysis applies float64_numerics too: an eager float64 Llama as
    transformers builds it (float32 RMSNorm and softmax) gets the FD HVP of the float64 model (1.3e-3 off
    with the RMSNorm fix alone)."""
    from hessian_core import FiniteDifferenceHVP, ParamSpace, exact_hvp, probe_vector
    from hessian_core.models import prepare_for_analysis
    from helpers import flatten, rel

    model = make_tiny_model("llama", train_steps=5)
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    v = probe_vector(ParamSpace(model), seed=0, probe_index=0, dtype=torch.float64)
    exact = flatten(exact_hvp(model, batches, v=v))
    for module in model.modules():
        module.__dict__.pop("forward", None)
    model.set_attn_implementation("eager")
    prepare_for_analysis(model)
    hv = FiniteDifferenceHVP(model, batches, eps=1e-5, space=ParamSpace(model)).matvec(v)
    assert rel(flatten(hv), exact) <= 1e-6


def test_auto_eps_and_the_time_series_row(llama_dense, tmp_path):
    model, batches, hessian = llama_dense
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    result = analyze(model, batches, probes=2, steps=20, eps="auto", blocks=True, block_probes=1)
    assert result.eps_choice is not None and result.eps_choice.source == "auto" and result.eps == result.eps_choice.eps
    assert abs(result.lambda_max - top) <= 1e-6 * abs(top)
    assert 0 <= result.whole_block_rel_error <= 2
    path = str(tmp_path / "series.parquet")
    for step in (0, 10):
        append_row(path, {"step": step, **result.summary()})
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column("step").to_pylist() == [0, 10]
    assert {"lambda_max", "trace", "outlier_count", "whole_block_rel_error"} <= set(table.column_names)


def test_bad_arguments_fail_in_one_line(llama_dense):
    model, batches, _ = llama_dense
    with pytest.raises(ValueError, match="probes"):
        analyze(model, batches, probes=0)
    with pytest.raises(ValueError, match="param_filter selected no"):
        analyze(model, batches, param_filter=lambda n, p: False)
    with pytest.raises(ValueError, match="input_ids"):
        analyze(model, [{"tokens": batches[0]}])
    assert not model.training  # restored after the failure too


def small_problem():
    """A 50-parameter model and a smooth loss of it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 10).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    return model, [x], lambda m, b: torch.tanh(m(b)).pow(2).mean()


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1e-3, "big"])
def test_an_eps_that_is_not_finite_and_positive_is_refused_before_any_compute(eps):
    model, batches, loss_fn = small_problem()
    with pytest.raises(ValueError):
        analyze(model, batches, loss_fn=loss_fn, probes=1, steps=4, eps=eps)


def test_steps_beyond_the_dimension_are_capped_to_it_with_a_warning():
    model, batches, loss_fn = small_problem()
    with pytest.warns(UserWarning):
        result = analyze(model, batches, loss_fn=loss_fn, probes=1, steps=100_000, eps=1e-5)  # reorth: window
    assert result.num_params == 50 and result.lanczos[0].steps <= 50 and result.hvp_count <= 50
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        weight, bias = theta[:40].reshape(10, 4), theta[40:]
        return torch.tanh(batches[0] @ weight.T + bias).pow(2).mean()

    top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))[-1])
    assert abs(result.lambda_max - top) <= 1e-6 * abs(top)


@pytest.mark.slow
def test_two_rank_fsdp2_training_step_is_untouched_by_analyze(tmp_path):
    import torch.multiprocessing as mp

    from actors.worker import free_port
    from api_dist_worker import run_rank

    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["untouched"] and r["same"] for r in ranks), ranks
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]  # one global spectrum, agreed by all ranks
    # gloo had let go of every reduced tensor when the reduction returned: a tensor it frees itself at exit aborts
    assert [r["held_after_reduce"] for r in ranks] == [0, 0]
    model = make_tiny_model("gpt_neox")
    assert ranks[0]["num_params"] == sum(p.numel() for p in model.parameters())
    from test_masked_loss import masked_batches

    single = analyze(model, masked_batches(), probes=1, steps=4, eps=1e-4, reorth="full")
    halves = [[{k: t[r::2] for k, t in b.items()} for b in masked_batches()] for r in range(2)]
    from hessian_core import counted_tokens

    assert [sum(map(counted_tokens, h)) for h in halves] == [7, 6]  # unequal: a per-rank mean would differ
    for r in ranks:
        assert abs(r["masked_loss"] - single.loss) <= 1e-12 * single.loss
        assert float((r["masked_alphas"] - single.lanczos[0].alphas).norm() / single.lanczos[0].alphas.norm()) <= 1e-9
