"""Variance-reduced trace estimates (hessian_core.trace): Hutch++ and the deflated trace against plain Hutchinson at
the same HVP count, on explicit matrices and on a tiny model's dense float64 Hessian over 20 seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessian_core import ParamSpace, thick_restart_lanczos
from hessian_core.trace import deflated_trace, hutchinson, hutchpp

SEEDS = 20


def dense_operator(matrix: torch.Tensor, space: ParamSpace):
    sizes = [p.numel() for p in space.params]

    def matvec(v):
        flat = matrix @ torch.cat([t.reshape(-1).to(matrix.dtype) for t in v])
        return [c.reshape(p.shape) for c, p in zip(flat.split(sizes), space.params)]

    return matvec


@pytest.mark.parametrize("arch", ["llama"], scope="session")  # the session's tiny Llama and its dense Hessian (conftest.tiny_f64)
def test_deflated_trace_beats_hutchinson_at_the_same_hvp_count_over_20_seeds(tiny_f64, capsys):
    """The k = 20 eigenpairs largest in magnitude (thick-restart Lanczos, whose HVPs are counted) summed exactly
    plus 100 Hutchinson samples on the rest, against Hutchinson with as many HVPs in all, on the tiny Llama's dense
    Hessian: the standard error is lower on average, and so is the error against the dense trace. (Measured,
    stderr ratio and mean |error| ratio: at 100 samples, llama 0.71, 0.79; at 300, gpt_neox 0.76, 0.97; llama 0.60,
    0.62; qwen2 0.59, 0.39.)"""
    arch, model, _, hessian = tiny_f64
    space = ParamSpace(model)
    matvec = dense_operator(hessian, space)
    exact = float(torch.trace(hessian))
    pairs = thick_restart_lanczos(matvec, space=space, k=20, which="LM", tol=1e-6, max_hvps=2000,
                                  vector_dtype=torch.float64, seed=1)
    assert pairs.converged.all()
    samples = 100
    budget = pairs.hvps + samples
    errors, stderrs = [], []
    for seed in range(SEEDS):
        d = deflated_trace(matvec, space=space, eigenvalues=pairs.eigenvalues.tolist(), eigenvectors=pairs.eigenvectors,
                           samples=samples, seed=seed)
        h = hutchinson(matvec, space=space, samples=budget, seed=seed)
        assert d.hvps == samples and h.hvps == budget
        errors.append((abs(d.trace - exact), abs(h.trace - exact)))
        stderrs.append((d.stderr, h.stderr))
    errors, stderrs = np.array(errors), np.array(stderrs)
    stderr_ratio = stderrs[:, 0].mean() / stderrs[:, 1].mean()
    error_ratio = errors[:, 0].mean() / errors[:, 1].mean()
    per_seed = errors[:, 0] / errors[:, 1]
    with capsys.disabled():
        print(f"\n{arch}: {budget} HVPs ({pairs.hvps} for the pairs); stderr ratio {stderr_ratio:.3f}; mean |error| "
              f"ratio {error_ratio:.3f}, per seed median {np.median(per_seed):.2f} (quartiles "
              f"{np.quantile(per_seed, 0.25):.2f}-{np.quantile(per_seed, 0.75):.2f})")
    assert stderr_ratio < 0.85 and error_ratio < 1.0
    # each standard error is honest: the errors are within 3 of their own standard errors on average
    assert np.mean(errors[:, 0] / stderrs[:, 0]) <= 3.0 and np.mean(errors[:, 1] / stderrs[:, 1]) <= 3.0


def _explicit(values: np.ndarray, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(values), len(values))))
    return torch.tensor(q @ np.diag(values) @ q.T)


def test_hutchpp_is_exact_on_a_low_rank_matrix_and_beats_hutchinson_on_a_decaying_spectrum():
    model = torch.nn.Linear(20, 20, bias=False).double()  # any parameters: 400 of them
    space = ParamSpace(model)
    n = space.numel
    low_rank = np.zeros(n)
    low_rank[:6] = [50, 20, 9, 4, 2, 1]
    a = hutchpp(dense_operator(_explicit(low_rank, 0), space), space=space, sketch=8, max_hvps=30)
    assert abs(a.trace - low_rank.sum()) <= 1e-9 * low_rank.sum() and a.stderr <= 1e-9 * low_rank.sum()
    assert a.hvps == 30 and a.sketch == 6  # the sketch's span is the matrix's range: 6 vectors kept of 8

    decaying = 100.0 / (1 + np.arange(n)) ** 2  # PSD, most of its Frobenius norm in a few eigenvalues
    matvec = dense_operator(_explicit(decaying, 1), space)
    ratios = []
    for seed in range(SEEDS):
        pp = hutchpp(matvec, space=space, sketch=10, max_hvps=30, seed=seed)
        hu = hutchinson(matvec, space=space, samples=30, seed=seed)
        ratios.append(abs(pp.trace - decaying.sum()) / abs(hu.trace - decaying.sum()))
    assert np.mean(ratios) < 0.5, np.mean(ratios)
    # rtol: samples stop once the standard error is small enough
    adaptive = hutchpp(matvec, space=space, sketch=10, max_hvps=500, rtol=1e-2, seed=0)
    assert adaptive.stopped == "rtol" and adaptive.stderr <= 1e-2 * abs(adaptive.trace) and adaptive.hvps < 500
