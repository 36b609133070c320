"""Top-k eigenpairs by thick-restart Lanczos, against explicit matrices with known spectra and the tiny float64 models'
dense Hessians; resume bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import dense_hessian, flatten, make_batches, make_tiny_model
from hessian_core import (ParamSpace, eigenpairs, exact_hvp, latest_eigen_state, load_eigen_state, save_eigen_state,
                          thick_restart_lanczos)


# -- explicit matrices -----------------------------------------------------------------------------------------

def matrix_operator(matrix: torch.Tensor):
    """(space, matvec) for an explicit matrix acting on two parameters (a [rows, 7] weight and a bias) whose
    flattened concatenation has the matrix's size."""
    n = matrix.shape[0]
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.zeros((n - 5) // 7, 7, dtype=torch.float64))
    holder.bias = torch.nn.Parameter(torch.zeros(n - holder.weight.numel(), dtype=torch.float64))
    space = ParamSpace(holder)

    def matvec(v):
        out = matrix @ torch.cat([t.reshape(-1).to(torch.float64) for t in v])
        return [out[:holder.weight.numel()].view_as(holder.weight), out[holder.weight.numel():]]

    return space, matvec


# Outliers on both sides of a bulk in [-2, 7.5], their magnitudes all distinct, so that LA, SA and LM pick
# different pairs; the closest neighbours of a wanted eigenvalue are 0.2 apart (LM's 9.0 and -8.8).
TOP = [10.0, 9.5, 9.0, 8.6, 8.3, 8.0]
BOTTOM = [-9.7, -9.2, -8.8, -8.45, -8.15, -7.9]


def known_spectrum(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.rand(n - len(TOP) - len(BOTTOM), generator=g, dtype=torch.float64) * 9.5 - 2
    values = torch.cat([torch.tensor(TOP + BOTTOM, dtype=torch.float64), bulk])
    matrix = q @ torch.diag(values) @ q.T
    return (matrix + matrix.T) / 2, values


def wanted(values: np.ndarray, which: str, k: int) -> np.ndarray:
    key = {"LA": -values, "SA": values, "LM": -np.abs(values)}[which]
    return np.argsort(key, kind="stable")[:k]


def as_matrix(vectors) -> torch.Tensor:
    return torch.stack([flatten(u) for u in vectors])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_explicit_matrix_eigenpairs_to_1e_10(which):
    matrix, _ = known_spectrum()
    exact, vectors = torch.linalg.eigh(matrix)
    space, matvec = matrix_operator(matrix)
    result = thick_restart_lanczos(matvec, space=space, k=5, which=which, tol=1e-10, max_hvps=2000)
    pick = wanted(exact.numpy(), which, 5)
    scale = float(exact.abs().max())
    assert result.stopped == "converged" and result.all_converged and result.restarts >= 2
    assert np.max(np.abs(result.eigenvalues - exact.numpy()[pick])) <= 1e-10 * scale
    cosines = (as_matrix(result.eigenvectors) @ vectors[:, pick]).diagonal().abs()
    assert float(cosines.min()) >= 1 - 1e-10
    gram = as_matrix(result.eigenvectors) @ as_matrix(result.eigenvectors).T
    assert float((gram - torch.eye(5, dtype=torch.float64)).abs().max()) <= 1e-12


def test_a_spent_budget_stops_early_and_flags_each_pair_by_its_true_residual():
    matrix, _ = known_spectrum()
    space, matvec = matrix_operator(matrix)
    tol = 1e-10
    result = thick_restart_lanczos(matvec, space=space, k=5, which="LA", tol=tol, max_hvps=50)
    assert result.stopped == "max_hvps" and result.hvps == 50 and not result.all_converged
    u = as_matrix(result.eigenvectors)
    true = (u @ matrix - torch.as_tensor(result.eigenvalues)[:, None] * u).norm(dim=1).numpy()
    assert np.allclose(result.residuals, true, rtol=1e-6, atol=1e-12 * 10)  # the reported residuals are the real ones
    assert result.norm_estimate <= float(torch.linalg.eigvalsh(matrix).abs().max()) * (1 + 1e-12)  # from below
    assert list(result.converged) == list(true <= tol * result.norm_estimate)
    assert result.converged[0] and not result.converged[-1]  # the best pair first, the budget cut the rest short


def test_invariant_krylov_spaces_go_on_from_fresh_directions_and_a_spanned_space_is_exact():
    # 5 distinct eigenvalues, each 8 times: the Krylov space of any start vector is invariant after 5 steps.
    # Fresh random directions (orthogonal to the basis) carry on and find further copies; like any Krylov
    # method it cannot know it holds every copy: what it returns are exact, orthonormal eigenpairs.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0]).repeat_interleave(8).double()) @ q.T
    space, matvec = matrix_operator((matrix + matrix.T) / 2)
    result = thick_restart_lanczos(matvec, space=space, k=5, which="LA", tol=1e-10)
    u = as_matrix(result.eigenvectors)
    assert result.all_converged and result.eigenvalues[0] == pytest.approx(7.0, abs=1e-12)
    assert np.sum(np.isclose(result.eigenvalues, 7.0, atol=1e-12)) >= 2  # a copy only a fresh direction finds
    assert float((u @ matrix - torch.as_tensor(result.eigenvalues)[:, None] * u).norm(dim=1).max()) <= 1e-12
    assert float((u @ u.T - torch.eye(5, dtype=torch.float64)).abs().max()) <= 1e-12
    small, _ = known_spectrum(12)  # a basis that spans the whole space: every pair exact, residual 0
    space, matvec = matrix_operator(small)
    whole = thick_restart_lanczos(matvec, space=space, k=5, which="SA", tol=0.0)
    assert whole.stopped == "converged" and whole.hvps == 12 and np.all(whole.residuals == 0)
    assert np.allclose(whole.eigenvalues, np.sort(np.linalg.eigvalsh(small.numpy()))[:5], atol=1e-12)


def test_bad_arguments_are_refused_in_one_line():
    matrix, _ = known_spectrum(20)
    space, matvec = matrix_operator(matrix)
    for kwargs, match in [({"which": "BE"}, "which"), ({"k": 21}, "k must be"), ({"tol": -1.0}, "tol"),
                          ({"basis": 6}, "basis"), ({"max_hvps": 0}, "max_hvps")]:
        with pytest.raises(ValueError, match=match):
            thick_restart_lanczos(matvec, space=space, **{"k": 5, **kwargs})


# -- checkpoints -----------------------------------------------------------------------------------------------

def test_two_restarts_saved_loaded_and_finished_give_the_uninterrupted_bits(tmp_path):
    # an FD operator is symmetric only up to its error: the asymmetry makes every rounding difference grow
    matrix, _ = known_spectrum(200, seed=1)
    matrix = matrix + 1e-6 * torch.randn(200, 200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    space, matvec = matrix_operator(matrix)
    options = dict(space=space, k=5, which="SA", tol=1e-9, max_hvps=2000, basis=12)
    whole = thick_restart_lanczos(matvec, **options)
    assert whole.restarts > 3

    class Killed(Exception):
        pass

    def save_then_die(state):
        save_eigen_state(state, folder=str(tmp_path), space=space, meta={"run": "x"})
        if state.restarts == 2:
            raise Killed

    with pytest.raises(Killed):
        thick_restart_lanczos(matvec, on_restart=save_then_die, **options)
    (tmp_path / "state-000099-0000000").mkdir()  # a save cut short (no COMPLETE) is ignored
    path, meta = latest_eigen_state(str(tmp_path))
    assert meta["restarts"] == 2 and meta["world_size"] == 1 and meta["run"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"state-000002-{meta['hvps']:07d}", "state-000099-0000000"]
    resumed = thick_restart_lanczos(matvec, state=load_eigen_state(path, space=space), **options)
    assert (resumed.hvps, resumed.restarts) == (whole.hvps, whole.restarts)
    assert np.array_equal(resumed.eigenvalues, whole.eigenvalues) and np.array_equal(resumed.residuals, whole.residuals)
    assert all(torch.equal(flatten(a), flatten(b)) for a, b in zip(resumed.eigenvectors, whole.eigenvectors))


# -- a tiny float64 model against its dense Hessian ------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dense():
    """(model, batches, dense eigenvalues ascending, eigenvectors as columns)."""
    model = make_tiny_model("llama")
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    values, vectors = torch.linalg.eigh(dense_hessian(model, batches))
    return model, batches, values, vectors


def separation(values: torch.Tensor, pick: np.ndarray) -> float:
    """The smallest distance from a picked eigenvalue to any other eigenvalue (the gap in Davis-Kahan's bound)."""
    v = values.numpy()
    return min(float(np.min(np.abs(np.delete(v, i) - v[i]))) for i in pick)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_exact_operator_on_the_tiny_model_matches_the_dense_hessian(llama_dense, which):
    model, batches, values, vectors = llama_dense
    space = ParamSpace(model)
    tol = 1e-8
    result = thick_restart_lanczos(lambda v: exact_hvp(model, batches, v=v), space=space, k=5, which=which, tol=tol)
    pick = wanted(values.numpy(), which, 5)
    scale = float(values.abs().max())
    assert result.all_converged
    assert np.max(np.abs(result.eigenvalues - values.numpy()[pick])) <= 1e-10 * scale
    # Davis-Kahan: sin(angle) <= residual / gap, and 1 - |cos| <= sin^2; a gap of 1e3 x (tol |lambda|max) or more
    # makes 1 - |cos| <= 1e-6 follow from the converged residuals (llama: the gaps are 0.46 (LA) and 0.32 (SA))
    gap = separation(values, pick)
    assert gap >= 1e3 * tol * scale
    cosines = (as_matrix(result.eigenvectors) @ vectors[:, pick]).diagonal().abs()
    assert float(cosines.min()) >= 1 - 1e-6


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigenpairs_with_the_fd_operator_at_auto_eps_and_the_model_given_back(llama_dense, which):
    model, batches, values, vectors = llama_dense
    before = [p.detach().clone() for p in model.parameters()]
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]  # the training's last gradients
    tol = 1e-6
    result = eigenpairs(model, batches, k=5, which=which, tol=tol)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not model.training
    assert all(p.grad is g and torch.equal(g, c) for p, (g, c) in zip(model.parameters(), grads))
    pick = wanted(values.numpy(), which, 5)
    scale = float(values.abs().max())
    assert result.all_converged and result.eps_choice.source == "auto"
    assert np.max(np.abs(result.eigenvalues - values.numpy()[pick])) <= 1e-6 * scale
    assert separation(values, pick) >= 1e3 * tol * scale  # Davis-Kahan, as above
    cosines = (as_matrix(result.eigenvectors) @ vectors[:, pick]).diagonal().abs()
    assert float(cosines.min()) >= 1 - 1e-6
    assert result.hvp_count > result.hvps  # the eps calibration's HVPs counted apart
    bars = result.error_bars
    assert all(b.fd_bound > 0 and b.total == pytest.approx(b.ritz_residual + b.fd_bound) for b in bars)
    table = result.to_arrow()
    assert table.column_names == ["index", "eigenvalue", "residual", "fd_bound", "error", "converged"]
