"""Spectrum statistics and the spectral distance on spectra whose answers are known."""

import numpy as np
import pytest
import torch

from hessian_core import ParamSpace, SpectralMeasure, lanczos, probe_vector, ritz_rule
from hessian_core import RitzRule
from hessian_core.statistics import CONVERGED, ZERO_BAND, spectral_distance, spectrum_statistics


def slq_rules(eigenvalues: torch.Tensor, *, probes: int = 8, steps: int = 60, seed: int = 0, reorth: str = "full"):
    holder = torch.nn.Module()
    holder.x = torch.nn.Parameter(torch.zeros(len(eigenvalues), dtype=torch.float64))
    space = ParamSpace(holder)
    rules = []
    for p in range(probes):
        v0 = probe_vector(space, seed=seed, probe_index=p, dtype=torch.float64)
        res = lanczos(lambda v: [eigenvalues * v[0]], v0, space=space, steps=steps, reorth=reorth,
                      vector_dtype=torch.float64)
        rules.append(ritz_rule(res.alphas, res.betas))
    return rules


def spiked(n=600, spikes=(6.0, 8.0, 11.0), shift=0.0):
    g = torch.Generator().manual_seed(0)
    bulk = torch.rand(n - len(spikes), generator=g, dtype=torch.float64) + shift
    return torch.cat([bulk, torch.tensor(spikes, dtype=torch.float64)])


def test_bulk_edges_outlier_count_and_mass_of_a_spiked_spectrum():
    eig = spiked()
    stats = spectrum_statistics(slq_rules(eig), dimension=len(eig))
    assert stats.outlier_count == pytest.approx(3.0)
    assert stats.outlier_mass == pytest.approx(3 / 600, rel=0.5)  # SLQ weights of 8 probes: a noisy estimate
    assert 0.0 <= stats.bulk_lower <= 0.05 and 0.9 <= stats.bulk_upper <= 1.0
    assert stats.lambda_max == pytest.approx(11.0, abs=1e-8)
    assert stats.trace == pytest.approx(float(eig.sum()), rel=0.05)
    assert stats.negative_mass == 0.0


def test_negative_mass_of_a_shifted_spectrum():
    eig = spiked(shift=-0.25)  # a quarter of the uniform bulk lies below zero
    stats = spectrum_statistics(slq_rules(eig), dimension=len(eig))
    band = ZERO_BAND * float(eig.max() - eig.min())
    assert 0.1 < float((eig < -band).double().mean()) < 0.2
    assert stats.negative_mass == pytest.approx(float((eig < -band).double().mean()), abs=0.05)
    assert stats.lambda_min == pytest.approx(float(eig.min()), abs=1e-3)


def test_spectral_distance_is_zero_to_itself_and_grows_with_a_shift():
    eig = spiked()
    ref = SpectralMeasure.from_rules(slq_rules(eig))
    assert spectral_distance(ref, ref) == pytest.approx(0.0, abs=1e-15)
    shifted = SpectralMeasure(ref.values + 0.11, ref.weights)
    assert spectral_distance(shifted, ref) == pytest.approx(0.11 / ref.width, rel=1e-9)
    # another set of probes of the same matrix is closer than a different matrix
    other_probes = SpectralMeasure.from_rules(slq_rules(eig, seed=9))
    other_matrix = SpectralMeasure.from_rules(slq_rules(spiked(shift=0.5), seed=9))
    assert spectral_distance(other_probes, ref) < spectral_distance(other_matrix, ref)
    assert np.isfinite(spectral_distance(other_probes, ref))


def test_negative_mass_ignores_the_sign_of_atoms_at_zero():
    """A Gauss node in a bulk at zero lands on either side by chance: within the band it is not negative."""
    width = 10.0
    rule = RitzRule(np.array([-0.5 * ZERO_BAND * width, 0.0, width]), np.array([0.7, 0.2, 0.1]), np.zeros(3))
    clearly = RitzRule(np.array([-2 * ZERO_BAND * width, 0.0, width]), np.array([0.7, 0.2, 0.1]), np.zeros(3))
    assert spectrum_statistics([rule], dimension=100).negative_mass == 0.0
    assert spectrum_statistics([clearly], dimension=100).negative_mass == pytest.approx(0.7)


def test_only_converged_ritz_values_beyond_the_bulk_count_as_outliers():
    bulk = np.linspace(0.0, 1.0, 20)
    values = np.concatenate([bulk, [10.0, 20.0]])
    weights = np.concatenate([np.full(20, 0.049), [0.01, 0.01]])
    residuals = np.concatenate([np.full(20, 0.1), [1e-9, 0.5]])  # 10 converged; 20 is a quadrature node
    stats = spectrum_statistics([RitzRule(values, weights, residuals)], dimension=1000)
    assert stats.bulk_upper == pytest.approx(1.0)
    assert stats.outlier_count == 1.0
    assert stats.outlier_mass == pytest.approx(0.02)


def test_ghost_copies_from_window_reorthogonalization_count_once():
    """reorth=window (the default) at 300 steps: each converged outlier comes back as 10-20 ghost copies."""
    spikes = (3.0, 5.0, 8.0, 13.0, 20.0)
    eig = spiked(n=2000, spikes=spikes)
    rules = slq_rules(eig, probes=2, steps=300, reorth="window")
    stats = spectrum_statistics(rules, dimension=len(eig))
    assert stats.outlier_count == len(spikes)
    tol = CONVERGED * (stats.lambda_max - stats.lambda_min)
    every_converged = [int(np.sum((r.values > stats.bulk_upper) & (r.residuals <= tol))) for r in rules]
    assert min(every_converged) > 2 * len(spikes)  # what the count was before ghosts were merged
