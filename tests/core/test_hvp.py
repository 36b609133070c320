"""The FD HVP operator against dense float64 Hessians on tiny GPT-NeoX, Llama and Qwen2 models."""

import pytest
import torch

from helpers import flatten, make_batches, make_tiny_model, rel
from hessian_core import (ExactHVPUnavailable, FiniteDifferenceHVP, ParamSpace, calibrate_eps, exact_hvp,
                          probe_vector)


def probe(model, index=0, dtype=torch.float64):
    return probe_vector(ParamSpace(model), seed=0, probe_index=index, dtype=dtype)


@pytest.mark.parametrize("case", [
    {"scheme": "central", "eps": 1e-5, "tol": 1e-7},
    {"scheme": "richardson", "eps": 1e-3, "tol": 1e-9},
])
def test_fd_hvp_matches_dense_hessian_float64(tiny_f64, case):
    _, model, batches, hessian = tiny_f64
    op = FiniteDifferenceHVP(model, batches, eps=case["eps"], scheme=case["scheme"])
    for index in range(2):
        v = probe(model, index)
        assert rel(flatten(op.matvec(v)), hessian @ flatten(v)) <= case["tol"]


def test_exact_hvp_matches_dense_hessian(tiny_f64):
    _, model, batches, hessian = tiny_f64
    v = probe(model)
    assert rel(flatten(exact_hvp(model, batches, v=v)), hessian @ flatten(v)) <= 1e-12


def test_fd_hvp_float32_at_auto_eps(tiny_f64):
    arch, model64, batches, hessian = tiny_f64
    model = make_tiny_model(arch, dtype=torch.float32)
    v = probe(model, dtype=torch.float32)
    op = FiniteDifferenceHVP(model, batches, eps=1.0)
    choice = calibrate_eps(op, v)
    assert choice.source == "auto" and choice.reliable, choice.message
    op = op.with_eps(choice.eps)
    assert rel(flatten(op.matvec(v)), hessian @ flatten(v)) <= 1e-3


def test_parameters_restored_bit_exactly_and_calls_are_deterministic(tiny_f64):
    _, model, batches, _ = tiny_f64
    before = [p.detach().clone() for p in model.parameters()]
    for scheme in ("central", "richardson"):
        op = FiniteDifferenceHVP(model, batches, eps=1e-2, scheme=scheme)
        v = probe(model, 3)
        first, second = op.matvec(v), op.matvec(v)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())


def test_the_gradient_norm_is_read_off_one_gradient_pass(tiny_f64):
    _, model, batches, _ = tiny_f64
    op = FiniteDifferenceHVP(model, batches, eps=1e-3)
    assert op.gradient_norm() == op.space.norm(op.gradient()[1])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scheme", ["central", "richardson"])
def test_the_hvp_accumulates_its_passes_in_its_output_buffer(tiny_f64, scheme):
    """Every backward of the HVP adds into the buffer it returns (no gradient-sized buffer beside it), and the
    result equals the stencil over separately computed gradients to rounding (the sum's order differs)."""
    _, model, batches, _ = tiny_f64
    assert len(batches) > 1  # several batches: the in-place sum's order really differs from the separate one's
    op = FiniteDifferenceHVP(model, batches, eps=1e-2, scheme=scheme)
    v = probe(model, 2)
    written = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: written.append(p.grad.data_ptr()))
             for p in model.parameters()]
    try:
        hv = op.matvec(v)
    finally:
        for h in hooks:
            h.remove()
    start = hv.flat.data_ptr()
    end = start + hv.flat.numel() * hv.flat.element_size()
    assert written and all(start <= ptr < end for ptr in written)

    stencil, divisor = {"central": ([(1, 1), (-1, -1)], 2), "richardson": ([(-1, 2), (8, 1), (-8, -1), (1, -2)], 12)}[scheme]
    reference = torch.zeros_like(flatten(v))
    with torch.no_grad():
        theta = [p.detach().clone() for p in model.parameters()]
    for coeff, step in stencil:
        with torch.no_grad():
            for p, t, d in zip(model.parameters(), theta, v):
                p.copy_(t + step * 1e-2 * d)
        reference += coeff * flatten(op.gradient()[1])
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    reference /= divisor * 1e-2
    assert rel(flatten(hv), reference) <= 1e-12

def test_both_passes_see_the_same_batches_in_the_loss_mean():
    model = make_tiny_model("gpt_neox")
    batches = make_batches(num_batches=3, batch_size=2, seed=3)
    v = probe(model)
    whole = FiniteDifferenceHVP(model, batches, eps=1e-5).matvec(v)
    parts = [FiniteDifferenceHVP(model, [b], eps=1e-5).matvec(v) for b in batches]
    mean = [sum(p[i] for p in parts) / 3 for i in range(len(whole))]
    assert rel(flatten(whole), flatten(mean)) <= 1e-8


def test_none_entries_mean_zero_components(tiny_f64):
    _, model, batches, hessian = tiny_f64
    v = probe(model)
    masked = [t if i < 3 else None for i, t in enumerate(v)]
    dense_v = flatten([t if i < 3 else torch.zeros_like(t) for i, t in enumerate(v)])
    got = FiniteDifferenceHVP(model, batches, eps=1e-5).matvec(masked)
    assert rel(flatten(got), hessian @ dense_v) <= 1e-7


def test_exact_hvp_refuses_flash_attention_in_one_line():
    model = make_tiny_model("llama", train_steps=0)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ExactHVPUnavailable) as info:
        exact_hvp(model, make_batches(), v=probe(model))
    assert "\n" not in str(info.value) and "flash_attention_2" in str(info.value)


def test_operator_refuses_training_mode_and_bad_arguments():
    model = make_tiny_model("gpt_neox", train_steps=0)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        FiniteDifferenceHVP(model, make_batches(), eps=1e-3)
    model.eval()
    with pytest.raises(ValueError, match="eps must be positive"):
        FiniteDifferenceHVP(model, make_batches(), eps=0.0)
    with pytest.raises(ValueError, match="scheme"):
        FiniteDifferenceHVP(model, make_batches(), eps=1e-3, scheme="backward")
