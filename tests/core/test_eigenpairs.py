"""Top-k eigenpairs by thick-restart Lanczos, against explicit matrices with known spectra and the tiny float64 models'
dense Hessians; resume bitwise and across world sizes; the measurements made with eigenvectors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import dense_hessian, flatten, make_batches, make_tiny_model, unflatten_like
from hessian_core import (ParamSpace, eigen_mass, eigenpairs, exact_hvp, gradient_fraction, landscape_1d, landscape_2d,
                          latest_eigen_state, load_eigen_state, load_eigenvectors, parameter_blocks, save_eigen_state,
                          save_eigenvectors, subspace_overlap, thick_restart_lanczos)


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
    from hessian_core.eigen_checkpoint import discard_incomplete

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
        save_eigen_state(state, folder=str(tmp_path), meta={"run": "x"})  # named by the state's own layout
        if state.restarts == 2:
            raise Killed

    with pytest.raises(Killed):
        thick_restart_lanczos(matvec, on_restart=save_then_die, **options)
    (tmp_path / "state-000099-0000000").mkdir()  # a save cut short (no COMPLETE) is ignored
    path, meta = latest_eigen_state(str(tmp_path))
    assert meta["restarts"] == 2 and meta["world_size"] == 1 and meta["run"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"state-000002-{meta['hvps']:07d}", "state-000099-0000000"]
    discard_incomplete(str(tmp_path))  # and removed before the resumed run saves
    assert [p.name for p in tmp_path.iterdir()] == [f"state-000002-{meta['hvps']:07d}"]
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
    # each bar covers the eigenvalue's true error: the FD part measured along its own eigenvector (Rayleigh
    # quotients at eps and 2 eps, Richardson), where the Weyl bound 5 r |H| of lambda_max's bar fell 17x short
    # on an SA pair of this model
    errors = np.abs(result.eigenvalues - values.numpy()[pick])
    totals = np.array([b.total for b in bars])
    assert np.all(errors <= totals)  # measured: at most 0.09 (LA) and 0.42 (SA) of the bar
    # the old bar, 5 r |H|, for comparison: SA's second pair erred 17x beyond it
    weyl = 5 * result.hvp_relative_error * result.norm_estimate
    assert which == "LA" or np.max(errors) > 10 * weyl
    table = result.to_arrow()
    assert table.column_names == ["index", "eigenvalue", "residual", "fd_bound", "error", "converged"]


def test_eigenvectors_saved_as_dcp_read_back_bitwise_and_a_save_cut_short_leaves_the_last_whole_one(llama_dense,
                                                                                                  tmp_path,
                                                                                                  monkeypatch):
    import torch.distributed.checkpoint as dcp

    from hessian_core.eigen_checkpoint import partial_folder, saved_eigenvector_count

    model, _, _, vectors = llama_dense
    space = ParamSpace(model)
    u = [unflatten_like(vectors[:, i], model) for i in (-1, -2, -3)]
    folder = str(tmp_path / "eigenvectors")
    save_eigenvectors(u, space=space, folder=folder)
    loaded = load_eigenvectors(folder, space=space)
    assert len(loaded) == 3 and all(torch.equal(a, b) for x, y in zip(u, loaded) for a, b in zip(x, y))
    real_save = dcp.save

    def killed_mid_save(state, *, checkpoint_id, **kwargs):
        os.makedirs(checkpoint_id)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "w") as f:
            f.write("half a vector")
        raise OSError("killed mid-save")

    monkeypatch.setattr(dcp, "save", killed_mid_save)
    with pytest.raises(OSError, match="killed"):
        save_eigenvectors(u[:1], space=space, folder=folder)
    assert saved_eigenvector_count(folder) == 3  # the earlier whole save, untouched; the cut one under its own name
    assert os.path.isdir(partial_folder(folder))
    monkeypatch.setattr(dcp, "save", real_save)
    save_eigenvectors(u[:1], space=space, folder=folder)  # the next save clears the cut one and replaces the folder
    assert saved_eigenvector_count(folder) == 1 and not os.path.exists(partial_folder(folder))


# -- what users measure --------------------------------------------------------------------------------------

def test_landscape_1d_second_difference_is_lambda_1_within_the_truncation_bound(llama_dense):
    model, batches, values, vectors = llama_dense
    before = [p.detach().clone() for p in model.parameters()]
    h = 1e-3
    f = landscape_1d(model, batches, unflatten_like(vectors[:, -1], model), [-2 * h, -h, 0.0, h, 2 * h])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    second = (f[1] - 2 * f[2] + f[3]) / h ** 2
    # second - lambda_1 = h^2/12 f''''(xi) + round-off; f'''' from the five points' fourth difference, with a
    # factor 2 for its variation over [-h, h]; round-off: 4 eps_mach |f| / h^2
    fourth = (f[0] - 4 * f[1] + 6 * f[2] - 4 * f[3] + f[4]) / h ** 4
    bound = 2 * h ** 2 / 12 * abs(fourth) + 4 * np.finfo(float).eps * abs(f[2]) / h ** 2
    assert abs(second - float(values[-1])) <= bound
    assert bound <= 1e-4 * float(values[-1])  # and the bound is tight enough to mean something


def test_landscape_2d_hessian_at_0_is_the_projected_hessian(llama_dense):
    model, batches, values, vectors = llama_dense
    u = [unflatten_like(vectors[:, i], model) for i in (-1, -2)]
    projected = np.diag([float(values[-1]), float(values[-2])])  # U^T H U for two dense eigenvectors
    h = 3e-4
    grid = np.array([-2, -1, 0, 1, 2]) * h
    f = landscape_2d(model, batches, u[0], u[1], grid, grid)

    def hessian_at_0(step: int) -> np.ndarray:
        """Central differences on the grid points step x h from the centre."""
        c, d = 2, step
        a = (f[c + d, c] - 2 * f[c, c] + f[c - d, c]) / (d * h) ** 2
        b = (f[c, c + d] - 2 * f[c, c] + f[c, c - d]) / (d * h) ** 2
        m = (f[c + d, c + d] - f[c + d, c - d] - f[c - d, c + d] + f[c - d, c - d]) / (2 * d * h) ** 2
        return np.array([[a, m], [m, b]])

    fit, coarse = hessian_at_0(1), hessian_at_0(2)
    # O(h^2) truncation: the error at h is (coarse - fit) / 3 to leading order (Richardson); x2 for its next term,
    # plus round-off 4 eps_mach |f| / h^2 (and the mixed difference's, smaller)
    bound = 2 * np.abs(coarse - fit) / 3 + 4 * np.finfo(float).eps * abs(f[2, 2]) / h ** 2
    assert np.all(np.abs(fit - projected) <= bound)
    assert np.max(np.abs(fit - projected)) <= 1e-5 * float(values[-1])


def test_gradient_fraction_equals_the_dense_projection(llama_dense):
    model, batches, values, vectors = llama_dense
    from torch.func import functional_call

    from hessian_core import causal_lm_loss

    params = dict(model.named_parameters())
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    with torch.no_grad():
        detached = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    loss = sum(causal_lm_loss(lambda **kw: functional_call(model, detached, args=(), kwargs=kw), b)
               for b in batches) / len(batches)
    g = flatten(torch.autograd.grad(loss, list(detached.values())))
    top = vectors[:, -5:]
    expected = float((top.T @ g).pow(2).sum() / g.pow(2).sum())
    result = gradient_fraction(model, batches, [unflatten_like(top[:, i], model) for i in range(5)])
    assert abs(result.fraction - expected) <= 1e-8
    assert abs(result.grad_norm - float(g.norm())) <= 1e-10 * float(g.norm())
    assert abs(result.loss - loss.item()) <= 1e-12 * loss.item()
    mixed = top @ torch.triu(torch.ones(5, 5, dtype=torch.float64)) * 3.0  # another basis of the same span
    again = gradient_fraction(model, batches, [unflatten_like(mixed[:, i], model) for i in range(5)])
    assert abs(again.fraction - expected) <= 1e-8
    assert all(p.grad is g and torch.equal(g, c) for p, (g, c) in zip(model.parameters(), grads))


def test_eigen_mass_per_block_and_tensor_is_the_dense_vectors_squared_mass(llama_dense):
    model, _, _, vectors = llama_dense
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    u = [unflatten_like(vectors[:, i], model) for i in (-1, -2, 0)]
    mass = eigen_mass(u, space=space, model=model)
    assert np.allclose(mass.per_block.sum(axis=1), 1, atol=1e-14) and np.allclose(mass.per_tensor.sum(axis=1), 1)
    sizes = [p.numel() for p in model.parameters()]
    starts = np.cumsum([0] + sizes)
    for row, column in enumerate((-1, -2, 0)):
        v = vectors[:, column]
        for b, name in enumerate(mass.blocks):
            expected = sum(float(v[starts[i]:starts[i + 1]].pow(2).sum()) for i in blocks[name])
            assert abs(mass.per_block[row, b] - expected) <= 1e-12
    table = mass.to_arrow()
    assert table.num_rows == 3 * len(space.names) and table.column_names == ["eigenvector", "block", "tensor", "mass"]


def test_subspace_overlap_of_a_set_with_itself_and_with_a_known_rotation():
    matrix, _ = known_spectrum(60)
    _, vectors = torch.linalg.eigh(matrix)
    space, _ = matrix_operator(matrix)

    def as_vectors(columns: torch.Tensor):
        return [[c[:space.params[0].numel()].view_as(space.params[0]), c[space.params[0].numel():]] for c in columns.T]

    u = vectors[:, :4]
    same = subspace_overlap(as_vectors(u), as_vectors(u), space=space)
    assert np.allclose(same.matrix, np.eye(4), atol=1e-12) and np.allclose(same.angles, 0, atol=1e-6)
    angles = np.array([0.0, 0.1, 0.4, 1.2])
    rotated = u * torch.tensor(np.cos(angles)) + vectors[:, 4:8] * torch.tensor(np.sin(angles))  # each u_i towards w_i
    turned = subspace_overlap(as_vectors(u), as_vectors(rotated[:, [2, 0, 3, 1]]), space)
    assert np.allclose(np.sort(turned.angles), angles, atol=1e-7)
    assert np.allclose(turned.matrix[[0, 1, 2, 3], [1, 3, 0, 2]], np.cos(angles), atol=1e-12)


# -- 2 FSDP2 ranks -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_rank_fsdp2_eigenpairs_match_one_process_and_resume_on_one_rank(tmp_path):
    import torch.multiprocessing as mp

    from actors.worker import free_port
    from eigen_dist_worker import ARCH, LANDSCAPE_TS, batches_for, run_rank, solve

    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = make_tiny_model(ARCH)
    single, space = solve(model, batches_for(0, 1))
    scale = single.norm_estimate
    assert single.all_converged and single.restarts > 2

    def assembled(index: int) -> torch.Tensor:
        pieces = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
        for r in ranks:
            for (name, start), t in zip(r["shards"], r["vectors"][index]):
                pieces[name][start:start + t.numel()] = t
        return torch.cat(list(pieces.values()))

    # the eigenvectors the 2 ranks saved as DCP: read back bitwise on the 2 ranks (load_eigenvectors, DTensors)
    # and here by dcp.load into a plain model-shaped mapping per eigenvector (world size 1)
    import torch.distributed.checkpoint as dcp

    import warnings

    target = {f"eigenvector_{i}": {n: torch.empty_like(p) for n, p in model.named_parameters()} for i in range(5)}
    with warnings.catch_warnings():  # that it reads in one process, which it is asked to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(tmp_path / "vectors"), no_dist=True)
    assert all(r["reloaded"] for r in ranks)
    assert all(torch.equal(flatten(list(target[f"eigenvector_{i}"].values())), assembled(i)) for i in range(5))
    assert not (tmp_path / ".vectors.partial").exists()
    for r in ranks:
        assert r["restored"] and r["converged"].all()
        assert np.max(np.abs(r["eigenvalues"] - single.eigenvalues)) <= 1e-10 * scale
    for i in range(5):  # one global vector across the ranks, equal to the single process's
        assert float((assembled(i) - flatten(single.eigenvectors[i])).norm()) <= 1e-8
    mass = eigen_mass(single, model=model).per_block
    fraction = gradient_fraction(model, batches_for(0, 1), single).fraction
    landscape = landscape_1d(model, batches_for(0, 1), single.eigenvectors[0], LANDSCAPE_TS)
    for r in ranks:
        assert np.allclose(r["mass"], mass, atol=1e-10) and abs(r["fraction"] - fraction) <= 1e-10
        assert np.allclose(r["landscape"], landscape, rtol=1e-12)
    # the state the 2 ranks saved after restart 2, finished by one process
    path, meta = latest_eigen_state(str(tmp_path / "state"))
    assert meta["world_size"] == 2 and meta["restarts"] == 2
    moved, _ = solve(model, batches_for(0, 1), state=load_eigen_state(path, space=space))
    assert moved.all_converged and np.max(np.abs(moved.eigenvalues - single.eigenvalues)) <= 1e-10 * scale
    assert all(abs(float(flatten(a) @ flatten(b))) >= 1 - 1e-10
               for a, b in zip(moved.eigenvectors, single.eigenvectors))


def test_a_bar_wider_than_5_percent_of_its_eigenvalue_is_named_as_untrustworthy():
    """The demo model's lambda_1 at the float32 auto eps: 22.45 +- 12 against 41.77 in float64 (BENCHMARKS.md): a
    bar that wide means the eps is far outside the bar's regime; a NaN bar is no bound either."""
    from hessian_core.error_bars import wide_bars

    assert wide_bars([22.45, 17.06, 9.4], [12.0, 0.5, 0.47]) == [0]
    assert wide_bars([41.5, -3.0], [1.6, 0.15]) == []  # 3.9% and 5.0%: within
    assert wide_bars([1.0, 2.0], [float("nan"), 0.2]) == [0, 1]
