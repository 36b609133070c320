"""eps = auto (Theorem 3.1) against a brute-force sweep of the FD error, and the bfloat16 warning."""

import numpy as np
import pytest
import torch

from helpers import dense_hessian, flatten, make_batches, make_tiny_model, rel
from hessian_core import FiniteDifferenceHVP, ParamSpace, calibrate, calibrate_eps, default_eps, probe_vector
from hessian_core.eps import FIRST_STEP, _auto_eps, _Ladder, _LadderStep


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


@pytest.mark.slow
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


def test_auto_eps_takes_a_ladder_step_only_near_the_optimum():
    """With |D3| = 6 and c = 2 the error model is e^2 + 2/e, minimal (3) at e = 1: a ladder step at 1.1
    (error 3.03) is taken as it is, steps at 0.5 (4.25) and 3 (9.7) are not, and the rounded optimum is."""
    def ladder(*steps):
        return _Ladder(third=6.0, hv_norm=1.0, smaller=_LadderStep(steps[0], [], 0.0),
                       larger=_LadderStep(steps[1], [], 0.0) if len(steps) > 1 else None)

    assert _auto_eps(ladder(0.5, 1.1), roundoff=2.0) == 1.1
    assert _auto_eps(ladder(0.5, 3.0), roundoff=2.0) == 1.0
    assert _auto_eps(ladder(1.05, 1.1), roundoff=2.0) == 1.05  # the better of two near steps
    assert _auto_eps(ladder(0.5), roundoff=2.0) == 1.0
    assert _auto_eps(ladder(0.5, 1.1), roundoff=2.0, snap=False) == 1.0  # mixed precision: never a ladder step


@pytest.mark.slow
def test_calibration_hands_over_the_hvp_at_a_chosen_ladder_step(tiny_f64):
    """A fixed eps equal to the ladder's first step: the calibration returns that HVP, bitwise what the
    operator computes there (it becomes a probe's first Lanczos matvec); another fixed eps gets none."""
    _, model, batches, _ = tiny_f64
    v = probe_vector(ParamSpace(model), seed=0, probe_index=0, dtype=torch.float64)
    op = FiniteDifferenceHVP(model, batches, eps=1.0)
    first = FIRST_STEP * default_eps(torch.float64)
    calls = op.calls
    kept = calibrate(op, v, eps=first)
    assert kept.choice.eps == first and kept.hvp is not None and kept.hvp_seconds > 0
    assert op.calls - calls == 2  # the ladder's pair, and no HVP again at the chosen eps
    assert all(torch.equal(a, b) for a, b in zip(kept.hvp, op.with_eps(first).matvec(v)))
    assert calibrate(op, v, eps=first * 1.5).hvp is None
