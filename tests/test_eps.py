"""eps = auto (Theorem 3.1) against a brute-force sweep of the FD error, and the bfloat16 warning."""

import numpy as np
import pytest
import torch

from conftest import dense_hessian, flatten, make_batches, make_tiny_model, rel
from hessian_core import FiniteDifferenceHVP, ParamSpace, calibrate_eps, probe_vector


@pytest.mark.parametrize("case", [
    {"dtype": torch.float64, "lo": -8, "hi": 0},
    {"dtype": torch.float32, "lo": -5, "hi": 0},
])
def test_auto_eps_within_3x_of_the_sweep_minimum(tiny_f64, case):
    arch, _, batches, hessian = tiny_f64
    model = make_tiny_model(arch, dtype=case["dtype"])
    v = probe_vector(ParamSpace(model), seed=0, probe_index=0, dtype=case["dtype"])
    reference = hessian @ flatten(v)
    op = FiniteDifferenceHVP(model, batches, eps=1.0)
    grid = np.logspace(case["lo"], case["hi"], 4 * (case["hi"] - case["lo"]) + 1)
    errors = []
    for eps in grid:
        errors.append(rel(flatten(op.with_eps(float(eps)).matvec(v)), reference))
    best = grid[int(np.argmin(errors))]
    choice = calibrate_eps(op, v)
    assert choice.source == "auto"
    assert best / 3 <= choice.eps <= best * 3, (choice.eps, best, errors)
    # the error estimate is of the right order: within 30x of the measured error at eps*
    op = op.with_eps(choice.eps)
    measured = rel(flatten(op.matvec(v)), reference)
    assert measured / 30 <= choice.relative_error <= measured * 30, (choice.relative_error, measured)


def test_bfloat16_calibration_is_honest_and_flags_a_step_lost_to_rounding():
    """On a tiny model a unit probe's entries are large enough for bf16 at eps ~ 0.5; the estimate must
    match the measured error, and a small fixed eps (the large-model regime: entries ~ eps / sqrt(P) far
    below bf16's spacing) must be flagged as rounded away."""
    model = make_tiny_model("gpt_neox", dtype=torch.bfloat16)
    exact_model = make_tiny_model("gpt_neox")
    exact_model.load_state_dict({k: t.double() for k, t in model.state_dict().items()})
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    reference = dense_hessian(exact_model, batches)
    v = probe_vector(ParamSpace(model), seed=0, probe_index=0, dtype=torch.float32)
    op = FiniteDifferenceHVP(model, batches, eps=1.0)
    choice = calibrate_eps(op, v)
    op = op.with_eps(choice.eps)
    measured = rel(flatten(op.matvec(v)), reference @ flatten(v))
    assert measured / 10 <= choice.relative_error + choice.perturbation_rounding <= measured * 10
    small = calibrate_eps(op, v, eps=1e-3)
    assert small.source == "fixed" and not small.reliable
    assert small.perturbation_rounding > 0.5 and "round away" in small.message and "float32" in small.message
