"""Curvature-approximation metrics (block diagonal, block tridiagonal, low rank, block diagonal + low-rank residual,
Gauss-Newton) against the same quantities computed from the dense float64 H, G and their dense eigenpairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import dense_gauss_newton, flatten, unflatten_like
from hessian_core import (APPROXIMATIONS, FiniteDifferenceHVP, GaussNewtonOperator, ParamSpace,
                          approximation_metrics, block_residual_operator, parameter_blocks, probe_vector,
                          thick_restart_lanczos)

K = 4
TOL = 1e-6


def masks(model, space, blocks) -> list[torch.Tensor]:
    starts = np.cumsum([0] + [p.numel() for p in space.params])
    out = []
    for idx in blocks.values():
        m = torch.zeros(int(starts[-1]), dtype=torch.bool)
        for i in idx:
            m[starts[i]:starts[i + 1]] = True
        out.append(m)
    return out


def block_diagonal_part(hessian, block_masks) -> torch.Tensor:
    b = torch.zeros_like(hessian)
    for m in block_masks:
        sel = m.nonzero().squeeze(1)
        b[sel.unsqueeze(1), sel] = hessian[sel.unsqueeze(1), sel]
    return b


def dense_metrics(h, a, block_masks) -> tuple[list[float], list[float], float, float]:
    rel = [float((h[m] - a[m]).norm() / h[m].norm()) for m in block_masks]
    cos = [float(h[m] @ a[m] / (h[m].norm() * a[m].norm())) for m in block_masks]
    return rel, cos, float((a - h).norm() / h.norm()), float(h @ a / (h.norm() * a.norm()))


def test_every_approximation_equals_its_dense_metrics(tiny_f64):
    arch, model, batches, hessian = tiny_f64
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    bm = masks(model, space, blocks)
    v = probe_vector(space, seed=5, probe_index=0, dtype=torch.float64)
    x = flatten(v)
    op = FiniteDifferenceHVP(model, batches, eps=1e-5, space=space)
    gn = GaussNewtonOperator(model, batches, eps=1e-5, space=space)

    values, vectors = torch.linalg.eigh(hessian)
    top = torch.argsort(values, descending=True)[:K]
    lowrank = (values[top].tolist(), [unflatten_like(vectors[:, j], model) for j in top])
    diag = block_diagonal_part(hessian, bm)
    r_values, r_vectors = torch.linalg.eigh(hessian - diag)
    big = torch.argsort(r_values.abs(), descending=True)[:K]
    residual = (r_values[big].tolist(), [unflatten_like(r_vectors[:, j], model) for j in big])

    seen = []
    got = approximation_metrics(op.matvec, v, space=space, blocks=blocks, approximations=APPROXIMATIONS,
                                lowrank=lowrank, residual_lowrank=residual, gauss_newton=gn.matvec,
                                on_hvp=lambda done, total: seen.append((done, total)))
    assert list(got) == list(APPROXIMATIONS)
    total = 1 + 2 * len(blocks) + 1
    assert seen == [(k, total) for k in range(1, total + 1)] and op.calls == total - 1 and gn.calls == 1

    h = hessian @ x
    tri = torch.zeros_like(h)
    for k, m in enumerate(bm):
        near = bm[max(k - 1, 0)].clone()
        for j in range(k, min(k + 2, len(bm))):
            near |= bm[j]
        tri[m] = (hessian @ torch.where(near, x, 0.0))[m]
    u, ru = vectors[:, top], r_vectors[:, big]
    want = {"block_diagonal": diag @ x, "block_tridiagonal": tri,
            "lowrank": u @ (values[top] * (u.T @ x)),
            "block_diagonal_plus_lowrank": diag @ x + ru @ (r_values[big] * (ru.T @ x)),
            "gauss_newton": dense_gauss_newton(model, batches) @ x}
    for name, a in want.items():
        rel, cos, whole, whole_cos = dense_metrics(h, a, bm)
        m = got[name]
        assert m.blocks == list(blocks)
        assert np.allclose(m.rel_error, rel, rtol=0, atol=TOL), (arch, name, m.rel_error, rel)
        assert np.allclose(m.cosine, cos, rtol=0, atol=TOL), (arch, name, m.cosine, cos)
        assert abs(m.whole_rel_error - whole) <= TOL and abs(m.whole_cosine - whole_cos) <= TOL, (arch, name)
    # the approximations differ from each other: a test that mixed them up would fail
    errors = [got[a].whole_rel_error for a in APPROXIMATIONS]
    assert min(abs(p - q) for i, p in enumerate(errors) for q in errors[i + 1:]) > 1e-3, errors


def test_block_residual_operator_and_its_lanczos_pairs(tiny_f64):
    arch, model, batches, hessian = tiny_f64
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    residual = hessian - block_diagonal_part(hessian, masks(model, space, blocks))
    op = FiniteDifferenceHVP(model, batches, eps=1e-5, space=space)
    r = block_residual_operator(op.matvec, blocks=blocks)
    v = probe_vector(space, seed=6, probe_index=0, dtype=torch.float64)
    want = residual @ flatten(v)
    assert float((flatten(r(v)) - want).norm() / want.norm()) <= 1e-7
    assert op.calls == 1 + len(blocks)
    got = thick_restart_lanczos(r, space=space, k=3, which="LM", tol=1e-8, max_hvps=600)
    dense = torch.linalg.eigvalsh(residual)
    top = dense[torch.argsort(dense.abs(), descending=True)[:3]]
    scale = float(dense.abs().max())
    assert got.converged.all()
    assert np.allclose(sorted(got.eigenvalues, key=abs), sorted(top.tolist(), key=abs), rtol=0, atol=1e-6 * scale)


def test_one_block_holding_everything_is_exact():
    from helpers import make_batches, make_tiny_model

    model = make_tiny_model("llama", train_steps=0)
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, make_batches(num_batches=1), eps=1e-4, space=space)
    v = probe_vector(space, seed=1, probe_index=0, dtype=torch.float64)
    got = approximation_metrics(op.matvec, v, space=space, blocks={"all": list(range(len(v)))},
                                approximations=("block_diagonal", "block_tridiagonal"))
    for m in got.values():
        assert m.rel_error == [0.0] and m.whole_rel_error == 0.0 and abs(m.whole_cosine - 1.0) <= 1e-12


def test_missing_inputs_and_unknown_names_are_refused_in_one_line():
    from helpers import make_tiny_model

    model = make_tiny_model("llama", train_steps=0)
    space = ParamSpace(model)
    calls = []
    v = space.zeros()
    blocks = parameter_blocks(model, space)
    cases = [(dict(approximations=("block_diagonal", "diagonal")), "diagonal"),
             (dict(approximations=()), "non-empty"),
             (dict(approximations=("lowrank",)), "lowrank="),
             (dict(approximations=("block_diagonal_plus_lowrank",)), "residual_lowrank="),
             (dict(approximations=("lowrank",), lowrank=([1.0, 2.0], [v])), "2 values and 1 vectors"),
             (dict(approximations=("gauss_newton",)), "gauss_newton=")]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as e:
            approximation_metrics(lambda x: calls.append(1), v, space=space, blocks=blocks, **kwargs)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not calls  # refused before any product
