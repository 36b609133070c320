"""Lanczos and SLQ on explicit symmetric matrices with known spectra."""

import numpy as np
import pytest
import torch

from hessian_core import (LanczosState, ParamSpace, SpectralMeasure, extreme_eigenvalues, lanczos, probe_vector, ritz_rule,
                          smoothed_density, trace_estimate, wasserstein1)


def matrix_operator(matrix: torch.Tensor):
    """(space, matvec) for an explicit matrix acting on one parameter of its size."""
    holder = torch.nn.Module()
    holder.x = torch.nn.Parameter(torch.zeros(matrix.shape[0], dtype=torch.float64))
    space = ParamSpace(holder)
    return space, lambda v: [matrix @ v[0].to(torch.float64)]


def wigner(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / np.sqrt(2 * n)


def marchenko_pastur(n, ratio=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, int(n / ratio), generator=g, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def diagonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 4 - 1)


SPECTRA = {"diagonal": diagonal, "wigner": wigner, "marchenko_pastur": marchenko_pastur}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_full_reorth_with_m_equal_n_recovers_every_eigenvalue(name):
    n = 60
    matrix = SPECTRA[name](n)
    space, matvec = matrix_operator(matrix)
    v0 = probe_vector(space, seed=1, probe_index=0, kind="gaussian", dtype=torch.float64)
    result = lanczos(matvec, v0, space=space, steps=n, reorth="full", vector_dtype=torch.float64, tol=0.0)
    assert result.steps == n
    rule = ritz_rule(result.alphas, result.betas)
    exact = np.linalg.eigvalsh(matrix.numpy())
    assert np.max(np.abs(rule.values - exact)) <= 1e-10 * np.max(np.abs(exact))
    assert abs(rule.weights.sum() - 1) < 1e-12


def test_without_reorthogonalization_converged_eigenvalues_get_ghost_copies():
    n = 200
    eig = torch.cat([torch.tensor([12.0, 10.0]), torch.linspace(0, 1, n - 2)]).double()
    space, matvec = matrix_operator(torch.diag(eig))
    v0 = probe_vector(space, seed=0, probe_index=0, dtype=torch.float64)
    copies = {}
    for mode in ("none", "full"):
        result = lanczos(matvec, v0, space=space, steps=120, reorth=mode, vector_dtype=torch.float64)
        values = ritz_rule(result.alphas, result.betas).values
        copies[mode] = int(np.sum(np.abs(values - 12.0) < 1e-6))
    assert copies["full"] == 1
    assert copies["none"] >= 2


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_slq_density_is_within_1_percent_wasserstein_of_the_spectrum(name):
    n = 400
    matrix = SPECTRA[name](n)
    space, matvec = matrix_operator(matrix)
    rules = []
    for probe in range(6):
        v0 = probe_vector(space, seed=2, probe_index=probe, dtype=torch.float64)
        result = lanczos(matvec, v0, space=space, steps=60, reorth="window", window=8, vector_dtype=torch.float64)
        rules.append(ritz_rule(result.alphas, result.betas))
    measure = SpectralMeasure.from_rules(rules)
    exact = np.linalg.eigvalsh(matrix.numpy())
    distance = wasserstein1((measure.values, measure.weights), (exact, np.full(n, 1.0 / n)))
    assert distance <= 0.01 * (exact[-1] - exact[0])
    trace = trace_estimate(rules, dimension=n)
    assert abs(trace.trace - exact.sum()) <= 4 * trace.stderr + 1e-9 * abs(exact).sum()
    extremes = extreme_eigenvalues(rules)
    assert abs(extremes.lambda_max - exact[-1]) <= max(extremes.lambda_max_residual, 1e-8)
    assert abs(extremes.lambda_min - exact[0]) <= max(extremes.lambda_min_residual, 1e-8)


def test_stops_cleanly_at_an_invariant_subspace():
    eig = torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0]).repeat_interleave(8).double()
    space, matvec = matrix_operator(torch.diag(eig))
    v0 = probe_vector(space, seed=0, probe_index=0, dtype=torch.float64)
    result = lanczos(matvec, v0, space=space, steps=30, reorth="full", vector_dtype=torch.float64)
    assert result.steps == 5 and result.stopped == "invariant subspace"
    values = ritz_rule(result.alphas, result.betas).values
    assert np.allclose(values, sorted([3.0, 1.0, -2.0, 0.5, 7.0]), atol=1e-10)


@pytest.mark.parametrize("case", [
    {"reorth": "none", "window": 0, "reductions": 2},
    {"reorth": "window", "window": 4, "reductions": 3},
    {"reorth": "window", "window": 1, "reductions": 3},
    {"reorth": "full", "window": 0, "reductions": 3},
])
def test_at_most_2_plus_r_scalar_reductions_per_step_and_bounded_storage(case, monkeypatch):
    n = 50
    space, matvec = matrix_operator(wigner(n))
    calls = []
    original = space.all_reduce
    monkeypatch.setattr(space, "all_reduce", lambda t, **kw: calls.append(t.numel()) or original(t, **kw))
    seen = []
    v0 = probe_vector(space, seed=0, probe_index=0, dtype=torch.float64)
    calls.clear()
    lanczos(matvec, v0, space=space, steps=20, reorth=case["reorth"], window=case["window"],
            vector_dtype=torch.float64, on_step=lambda s: seen.append(len(s.basis)))
    assert len(calls) == 20 * case["reductions"] + 1  # +1: the start vector's norm
    limit = {"none": 2, "window": max(case["window"], 2), "full": 21}[case["reorth"]]
    assert max(seen) <= limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_vector_storage_still_finds_the_extremes(dtype):
    n = 300
    eig = torch.cat([torch.tensor([20.0, -5.0]), torch.linspace(0, 1, n - 2)]).double()
    space, matvec = matrix_operator(torch.diag(eig))
    v0 = probe_vector(space, seed=0, probe_index=0, dtype=dtype)
    result = lanczos(matvec, v0, space=space, steps=40, reorth="window", window=8, vector_dtype=dtype)
    values = ritz_rule(result.alphas, result.betas).values
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    assert abs(values[-1] - 20.0) <= tol * 20 and abs(values[0] + 5.0) <= tol * 20


def test_density_integrates_to_one_and_is_never_negative():
    measure = SpectralMeasure(np.array([-1.0, 0.0, 0.1, 50.0]), np.array([0.1, 0.4, 0.4, 0.1]))
    d = smoothed_density(measure, grid_size=4000)
    assert np.all(d.density >= 0)
    assert abs(np.trapezoid(d.density, d.grid) - 1) < 1e-12
    assert d.sigma == pytest.approx(0.01 * 51)


def test_wasserstein1_of_known_measures():
    assert wasserstein1((np.array([0.0]), np.array([1.0])), (np.array([3.0]), np.array([1.0]))) == pytest.approx(3.0)
    a = wasserstein1((np.array([0.0, 1.0]), np.array([0.5, 0.5])), (np.array([0.0, 2.0]), np.array([0.5, 0.5])))
    assert a == pytest.approx(0.5)
    assert wasserstein1((np.array([1.0, 2.0]), np.array([1, 3.0])), (np.array([2.0, 1.0]), np.array([3, 1.0]))) == 0.0


@pytest.mark.parametrize("case", [{"reorth": "window", "dtype": torch.float64}, {"reorth": "full", "dtype": torch.float32},
                                  {"reorth": "none", "dtype": torch.bfloat16}])
def test_checkpointed_and_resumed_run_equals_an_uninterrupted_one_bitwise(case, tmp_path):
    from hessian_core import latest_complete_step, load_lanczos_state, save_lanczos_state

    # An FD HVP is symmetric only up to its error, which makes the reorthogonalization coefficients large enough
    # that summing the kept rows in another order changes the last bits: a resumed state must keep its row layout.
    # Step 6 with a window of 4 holds q_3..q_6 in rows 3, 0, 1, 2.
    matrix = wigner(80) + 1e-3 * torch.randn(80, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    space, matvec = matrix_operator(matrix)
    v0 = probe_vector(space, seed=0, probe_index=0, dtype=case["dtype"])
    options = dict(space=space, reorth=case["reorth"], window=4, vector_dtype=case["dtype"])
    whole = lanczos(matvec, v0, steps=20, **options)

    def save(state):
        if state.steps_done % 3 == 0:
            save_lanczos_state(state, folder=str(tmp_path), space=space, meta={"probe_id": 0})

    lanczos(matvec, v0, steps=8, on_step=save, **options)  # "crashes" after step 8; last checkpoint: step 6
    (tmp_path / "step-000099").mkdir()  # an unfinished save without its marker is ignored
    step, meta = latest_complete_step(str(tmp_path))
    assert step == 6 and meta["probe_id"] == 0 and meta["step"] == 6 and meta["world_size"] == 1
    assert not (tmp_path / "step-000003").exists()  # older steps are pruned once a newer one is complete
    kept = sorted(p.name for p in (tmp_path / "vectors").iterdir())
    assert kept == [f"q-{i:06d}" for i in meta["vectors"]]  # and so are the vectors no complete step needs
    state = load_lanczos_state(str(tmp_path), step=step, space=space)
    resumed = lanczos(matvec, None, steps=20, state=state, **options)
    assert torch.equal(resumed.alphas, whole.alphas) and torch.equal(resumed.betas, whole.betas)


class _RankSpace:
    """The part of a ParamSpace a checkpoint needs, for one rank of a dim-0 sharding of given parameters."""

    def __init__(self, full: dict[str, torch.Tensor], rank: int, world: int):
        from hessian_core.vectors import ShardInfo

        self.shards, self._local = [], []
        for name, t in full.items():
            rows = -(-t.shape[0] // world)  # FSDP2's split: ceil rows per rank, the last rank may get fewer
            lo, hi = min(rank * rows, t.shape[0]), min((rank + 1) * rows, t.shape[0])
            row = t[0].numel()
            self.shards.append(ShardInfo(name, t.shape, lo * row, (hi - lo) * row))
            self._local.append(t[lo:hi])
        self.device = torch.device("cpu")

    def local_params(self):
        return self._local


@pytest.mark.parametrize("before,after", [(2, 1), (1, 3), (3, 2)])
def test_a_checkpoint_written_by_w_ranks_loads_on_w_prime_ranks_bitwise(before, after, tmp_path):
    from hessian_core import latest_complete_step, load_lanczos_state
    from hessian_core.checkpoint import CheckpointWriter

    g = torch.Generator().manual_seed(0)
    full = {"a.weight": torch.randn(5, 3, generator=g, dtype=torch.float64),
            "b.bias": torch.randn(4, generator=g, dtype=torch.float64)}
    vectors = [{n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in full.items()} for _ in range(3)]

    def local_flat(vector, space):
        return torch.cat([vector[s.name].reshape(-1)[s.flat_start:s.flat_start + s.local_numel]
                          for s in space.shards])

    for rank in range(before):  # each rank writes its pieces; the last one to finish completes the step
        space = _RankSpace(full, rank, before)
        state = LanczosState.from_basis([local_flat(v, space) for v in vectors],
                                        shapes=[t.shape for t in space.local_params()], alphas=[1.0, 2.0],
                                        betas=[0.5, 0.25])
        assert latest_complete_step(str(tmp_path)) is None
        writer = CheckpointWriter(str(tmp_path), space=space, rank=rank, world_size=before, meta={"probe_id": 7})
        writer.save(state)
        writer.close()
    step, meta = latest_complete_step(str(tmp_path))
    assert step == 2 and meta["world_size"] == before and meta["vectors"] == [0, 1, 2]
    for rank in range(after):
        space = _RankSpace(full, rank, after)
        loaded = load_lanczos_state(str(tmp_path), step=step, space=space)
        assert loaded.alphas == [1.0, 2.0] and loaded.betas == [0.5, 0.25]
        for got, v in zip(loaded.basis, vectors):
            assert torch.equal(got, local_flat(v, space))


def test_discard_after_drops_what_a_killed_writer_left_beyond_the_resumed_step(tmp_path):
    from hessian_core.checkpoint import discard_after

    for name in ("step-000003", "step-000005", "vectors/q-000003", "vectors/q-000004", "vectors/q-000006"):
        (tmp_path / name).mkdir(parents=True)
    discard_after(str(tmp_path), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "vectors"]
    assert [p.name for p in (tmp_path / "vectors").iterdir()] == ["q-000003"]
