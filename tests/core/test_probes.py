"""Probe vectors: a pure function of (seed, probe index, parameter name), the same for any sharding."""

import math
from types import SimpleNamespace

import pytest
import torch

import hessian_core.vectors as vectors
from hessian_core import ParamSpace, probe_vector
from hessian_core.vectors import ShardInfo


def fake_space(shapes: dict, ranges: dict):
    """A ParamSpace stand-in holding the flat ranges [start, stop) of each parameter on one 'rank'."""
    shards = [ShardInfo(n, torch.Size(shapes[n]), ranges[n][0], ranges[n][1] - ranges[n][0]) for n in shapes]
    return SimpleNamespace(
        shards=shards, numel=sum(math.prod(s) for s in shapes.values()), device=torch.device("cpu"),
        local_params=lambda: [torch.zeros(s.local_numel) for s in shards],
        all_reduce=lambda t: t)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_any_split_of_a_parameter_draws_the_same_elements(kind, monkeypatch):
    monkeypatch.setattr(vectors, "PROBE_CHUNK", 7)  # many chunk boundaries inside tiny parameters
    shapes = {"a.weight": (5, 6), "b.bias": (13,)}
    whole = probe_vector(fake_space(shapes, {"a.weight": (0, 30), "b.bias": (0, 13)}), seed=3, probe_index=2,
                         kind=kind, dtype=torch.float64)
    for cut_a, cut_b in [(12, 5), (18, 0), (30, 13), (1, 7)]:
        left = probe_vector(fake_space(shapes, {"a.weight": (0, cut_a), "b.bias": (0, cut_b)}), seed=3,
                            probe_index=2, kind=kind, dtype=torch.float64)
        right = probe_vector(fake_space(shapes, {"a.weight": (cut_a, 30), "b.bias": (cut_b, 13)}), seed=3,
                             probe_index=2, kind=kind, dtype=torch.float64)
        if kind == "rademacher":  # gaussian normalization uses the (here local) norm: compare directions
            for w, l, r in zip(whole, left, right):
                assert torch.equal(torch.cat([l.reshape(-1), r.reshape(-1)]), w.reshape(-1))


def test_probes_are_unit_pure_and_distinct():
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.zeros(40, 3))
    holder.b = torch.nn.Parameter(torch.zeros(3))
    space = ParamSpace(holder)
    for kind in ("rademacher", "gaussian"):
        a = probe_vector(space, seed=0, probe_index=0, kind=kind, dtype=torch.float64)
        again = probe_vector(space, seed=0, probe_index=0, kind=kind, dtype=torch.float64)
        other = probe_vector(space, seed=0, probe_index=1, kind=kind, dtype=torch.float64)
        assert space.norm(a) == pytest.approx(1.0, abs=1e-12)
        assert all(torch.equal(x, y) for x, y in zip(a, again))
        assert not all(torch.equal(x, y) for x, y in zip(a, other))
    rad = probe_vector(space, seed=0, probe_index=0, dtype=torch.float64)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in rad]).abs(), torch.full((123,), 123 ** -0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rademacher"):
        probe_vector(space, seed=0, probe_index=0, kind="uniform")
