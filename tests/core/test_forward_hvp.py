"""The forward-difference HVP (hvp.scheme: forward): one gradient pass an HVP, and its own eps rule (O(eps)
truncation against round-off), checked against dense float64 Hessians on the tiny models and against the float64
double-backward HVP on the float32 demo model, at the auto eps and along the U curve."""

import copy

import numpy as np
import pytest
import torch

from helpers import flatten, make_batches, make_tiny_model, rel
from hessian_core import FiniteDifferenceHVP, ParamSpace, calibrate, exact_hvp, probe_vector
from hessian_core.eps import error_model


def probe(model, index=0, dtype=torch.float64):
    return probe_vector(ParamSpace(model), seed=0, probe_index=index, dtype=dtype)


def u_curve(op, v, reference, grid):
    """The calibration's choice, and for each eps of ``grid`` (and the auto eps last) the measured relative error
    of the forward HVP against ``reference`` and the forward rule's prediction."""
    choice = calibrate(op, v).choice
    norm = float(reference.norm())
    measured, predicted = [], []
    for eps in [*grid, choice.eps]:
        measured.append(rel(flatten(op.with_eps(float(eps)).matvec(v)), reference))
        predicted.append(error_model(float(eps), roundoff=choice.roundoff, third_derivative=choice.third_derivative,
                                     scheme="forward") / norm)
    return choice, np.array(measured), np.array(predicted)


@pytest.mark.parametrize("case", [
    {"dtype": torch.float64, "lo": -10, "hi": -4},  # round-off below ~3e-8, truncation above
    {"dtype": torch.float32, "lo": -6, "hi": -1},  # the same around ~1e-3
])
def test_forward_hvp_is_within_3x_of_its_own_rule_along_the_u_curve(tiny_f64, case):
    arch, _, batches, hessian = tiny_f64
    model = make_tiny_model(arch, dtype=case["dtype"])
    v = probe(model, dtype=case["dtype"])
    op = FiniteDifferenceHVP(model, batches, eps=1.0, scheme="forward")
    grid = np.logspace(case["lo"], case["hi"], 2 * (case["hi"] - case["lo"]) + 1)
    choice, measured, predicted = u_curve(op, v, hessian @ flatten(v), grid)
    assert choice.source == "auto" and choice.reliable and choice.scheme == "forward", choice.message
    assert "forward-difference rule" in choice.message
    ratio = measured / predicted
    assert np.all((ratio >= 1 / 3) & (ratio <= 3)), dict(zip(grid.tolist() + [choice.eps], ratio.round(2)))
    assert measured[-1] / 3 <= choice.relative_error <= 3 * measured[-1]  # the reported estimate at the auto eps
    best = grid[int(np.argmin(measured[:-1]))]
    assert best / 3 <= choice.eps <= 3 * best
    assert measured[0] > 30 * measured.min() and measured[-2] > 30 * measured.min()  # a U: both arms are there


def test_forward_hvp_on_the_float32_demo_model_against_the_float64_exact_hvp():
    """The demo model (float32, as hvp-error runs it) against the double-backward HVP of its float64 copy: its
    gradient round-off is 4-5x eps_mach |grad L|, which the forward rule measures."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from pipeline.run.demo import ensure_demo

    model_dir, data_file = ensure_demo()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor(pq.read_table(data_file).column("input_ids").to_pylist()[:16])
    batches = [ids[:8], ids[8:]]
    reference_model = copy.deepcopy(model).double().eval()
    v = probe(model, dtype=torch.float32)
    exact = flatten(exact_hvp(reference_model, batches, v=[t.double() for t in v]))
    op = FiniteDifferenceHVP(model, batches, eps=1.0, scheme="forward")
    grid = np.logspace(-5, 0, 6)
    choice, measured, predicted = u_curve(op, v, exact, grid)
    assert choice.source == "auto" and choice.reliable and choice.roundoff_source == "measured", choice.message
    ratio = measured / predicted
    assert np.all((ratio >= 1 / 3) & (ratio <= 3)), dict(zip(grid.tolist() + [choice.eps], ratio.round(2)))
    assert measured[-1] / 3 <= choice.relative_error <= 3 * measured[-1]
    assert measured[-1] <= 1.5 * measured[:-1].min()  # the auto eps is as good as the grid's best


def test_one_forward_hvp_costs_one_gradient_pass(tiny_f64):
    """The gradient at theta is computed once (with the first HVP, or by gradient_norm / the calibration) and
    reused by every later HVP, at any eps; central takes 2 passes an HVP, richardson 4."""
    _, model, batches, _ = tiny_f64
    v = probe(model, 1)
    op = FiniteDifferenceHVP(model, batches, eps=1e-7, scheme="forward")
    op.matvec(v)
    assert op.gradient_passes == 2  # the gradient at theta, then theta + eps v
    for eps in (1e-7, 1e-6, 1e-5):
        before = op.gradient_passes
        op.with_eps(eps).matvec(v)  # copies share the kept gradient
        assert op.gradient_passes - before == 1
    before = op.gradient_passes
    op.gradient_norm()
    assert op.gradient_passes == before  # read off the kept gradient
    for scheme, passes in (("central", 2), ("richardson", 4)):
        other = FiniteDifferenceHVP(model, batches, eps=1e-4, scheme=scheme)
        other.matvec(v)
        other.matvec(v)
        assert other.gradient_passes == 2 * passes

    fresh = FiniteDifferenceHVP(model, batches, eps=1.0, scheme="forward")
    chosen = calibrate(fresh, v)
    assert fresh.gradient_passes == 4  # the gradient, two ladder HVPs, the round-off HVP
    before = fresh.gradient_passes
    fresh.with_eps(chosen.choice.eps).matvec(v)
    assert fresh.gradient_passes - before == 1


def test_the_kept_gradient_is_recomputed_when_the_parameters_change(tiny_f64):
    """Parameters restored bit-exactly after each HVP (the kept gradient stays valid, and repeated calls agree
    bitwise); an in-place change by someone else makes the next HVP recompute it: it then equals a new operator's,
    and undoing the change brings the first result back."""
    arch, _, batches, _ = tiny_f64
    model = make_tiny_model(arch)
    v = probe(model, 3)
    before = [p.detach().clone() for p in model.parameters()]
    op = FiniteDifferenceHVP(model, batches, eps=1e-6, scheme="forward")
    first, second = op.matvec(v), op.matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert op.gradient_passes == 3

    index, weight = max(enumerate(model.parameters()), key=lambda ip: ip[1].numel())  # a weight matrix
    with torch.no_grad():
        weight.mul_(1.5)
    moved = op.matvec(v)
    assert op.gradient_passes == 5  # recomputed
    new = FiniteDifferenceHVP(model, batches, eps=1e-6, scheme="forward").matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(moved, new))
    assert rel(flatten(moved), flatten(first)) > 1e-4
    with torch.no_grad():
        weight.copy_(before[index])
    assert all(torch.equal(a, b) for a, b in zip(op.matvec(v), first))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_forward_hvp_is_the_difference_of_two_gradients(dtype):
    """The in-place pass (float64) and the copied one (bfloat16 parameters, float32 accumulator) both give
    (grad L(theta + eps v) - grad L(theta)) / eps of separately computed gradients."""
    model = make_tiny_model("gpt_neox", dtype=dtype)
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    eps = 1e-6 if dtype == torch.float64 else 0.5
    op = FiniteDifferenceHVP(model, batches, eps=eps, scheme="forward")
    v = probe(model, 2, dtype=dtype)
    hv = op.matvec(v)
    assert hv.flat.dtype == op.out_dtype
    theta = [p.detach().clone() for p in model.parameters()]
    at_theta = flatten(op.gradient()[1])
    with torch.no_grad():
        for p, t, d in zip(model.parameters(), theta, v):
            p.copy_(t + eps * d)
    reference = (flatten(op.gradient()[1]) - at_theta) / eps
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    assert rel(flatten(hv), reference) <= (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.slow
def test_forward_hvp_on_two_fsdp2_ranks_keeps_its_gradient_and_matches_one_process(tmp_path):
    """FSDP2's forward and backward leave the local shards' version counters alone, so the kept gradient at theta
    holds across HVPs on shards too (3 HVPs, 4 passes), and the sharded result is the one-process one."""
    import torch.multiprocessing as mp

    from actors.worker import free_port
    from forward_dist_worker import EPS, run_rank

    world, arch = 2, "llama"
    try:
        mp.spawn(run_rank, args=(world, free_port(), arch, str(tmp_path)), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # gloo's exit race (hessian_core.vectors.all_reduce_sum): a rank that wrote its result and destroyed its
        # process group can still abort at interpreter exit, once in a while on a loaded machine (seen once in
        # a fresh-clone CI run). Every rank's result must be there and whole; anything else is a failure.
        if e.signal_name != "SIGABRT" or not all((tmp_path / f"rank{r}.pt").exists() for r in range(world)):
            raise
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["passes"] == 4 and r["same"] and r["restored"] for r in ranks), [
        (r["passes"], r["same"], r["restored"]) for r in ranks]
    model = make_tiny_model(arch)
    batches = make_batches(num_batches=2, batch_size=2 * world, seed=7)
    space = ParamSpace(model)
    v = probe_vector(space, seed=11, probe_index=0, dtype=torch.float64)
    single = flatten(FiniteDifferenceHVP(model, batches, eps=EPS, scheme="forward").matvec(v))
    sharded = {name: torch.zeros(p.numel(), dtype=torch.float64) for name, p in zip(space.names, space.params)}
    for r in ranks:
        for (name, start), t in zip(r["shards"], r["hv"]):
            sharded[name][start:start + t.numel()] = t
    assert rel(torch.cat([sharded[name] for name in space.names]), single) <= 1e-8


def test_the_plan_counts_the_kept_gradient_and_one_pass_an_hvp(tmp_path):
    """plan: hvp.scheme forward adds its kept gradient at theta (S x the accumulator dtype) to the per-rank memory
    and predicts 1 gradient pass an HVP."""
    import math

    from pipeline.run.config import load_config
    from pipeline.run.plan import plan_run, predicted_seconds
    from test_plan import tiny_run_config

    central = load_config(tiny_run_config(tmp_path, cluster={"num_groups": 2}))
    forward = load_config(tiny_run_config(tmp_path, cluster={"num_groups": 2}, hvp={"scheme": "forward"}))
    plan_c, plan_f = plan_run(central), plan_run(forward)
    rows = dict(plan_f.rows)
    assert rows["FD HVP forward scheme: the kept gradient at theta"] == 4 * plan_f.shape.local_params
    assert plan_f.total - plan_c.total == 4 * plan_f.shape.local_params
    # 6 calibration gradients, then 2 probes per group x 10 HVPs x 1 pass (central: x 2)
    assert math.isclose(predicted_seconds(forward, 2, grad_seconds=1.0, measured_with=forward), 6 + 2 * 10)
    assert math.isclose(predicted_seconds(central, 2, grad_seconds=1.0, measured_with=central), 6 + 2 * 10 * 2)
