"""Variance-reduced trace estimates of an operator (Hutch++, Meyer et al. 2021) on plain or FSDP2-sharded parameters,
beside the SLQ probes' own Hutchinson trace.

Hutch++ with a sketch of s vectors: Y = H S for s Rademacher vectors S (s HVPs), Q = an orthonormal basis of Y's
span; the trace of H on that span exactly, sum_i q_i^T H q_i (s HVPs); plus Hutchinson on the rest,
P g^T (I - QQ^T) H (I - QQ^T) g for unit Rademacher g (P the dimension; one HVP a sample). Where a few large
eigenvalues carry the trace's variance (a Hessian's outliers) the sketch takes them out exactly, and the samples
only see the bulk. Samples are drawn until their standard error is <= ``rtol`` x |estimate| (at least
``min_samples``) or the HVP budget ``max_hvps`` is spent; every vector is a pure function of (seed, index), so an
estimate is the same at any world size. Memory: s + 1 vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .vectors import ParamSpace, Vector, probe_vector

Matvec = Callable[[Sequence[Tensor]], Vector]
SKETCH_SEED_OFFSET = 7_000_003  # the sketch's vectors and the samples come from two seed streams
SAMPLE_SEED_OFFSET = 8_000_003


@dataclass(frozen=True, kw_only=True)
class TraceEstimate:
    """``trace`` = ``sketch_trace`` (exact on the sketch's span) + the mean of ``samples`` (Hutchinson on the
    rest); ``stderr`` is the samples' standard error (nan with fewer than 2)."""

    trace: float
    stderr: float
    sketch_trace: float
    sketch: int
    samples: list[float] = field(default_factory=list)
    hvps: int = 0
    stopped: str = ""  # "rtol", "max_hvps"


def _orthonormal(vectors: list[Vector], *, space: ParamSpace, drop: float = 1e-10) -> list[Vector]:
    """Gram-Schmidt twice (sharded: one all-reduce per projection pass); vectors whose remainder is below ``drop``
    x their norm are dropped (a rank-deficient sketch)."""
    basis: list[Vector] = []
    for y in vectors:
        norm0 = space.norm(y)
        if norm0 == 0.0:
            continue
        w = [t.clone() for t in y]
        for _ in range(2):
            if basis:
                coeffs = space.dots([(q, w) for q in basis]).tolist()
                for c, q in zip(coeffs, basis):
                    torch._foreach_add_(w, q, alpha=-c)
        norm = space.norm(w)
        if norm > drop * norm0:
            torch._foreach_mul_(w, 1.0 / norm)
            basis.append(w)
    return basis


def hutchpp(matvec: Matvec, *, space: ParamSpace, sketch: int, max_hvps: int, rtol: float = 0.0,
            min_samples: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> TraceEstimate:
    """Hutch++ of ``matvec``'s operator (see the module docstring). ``rtol`` 0: spend the whole budget on samples
    (the fixed-budget Hutch++: ``max_hvps`` = 2 x sketch + samples)."""
    if sketch < 1 or max_hvps < 2 * sketch + 1:
        raise ValueError(f"hutchpp needs sketch >= 1 and max_hvps >= 2 x sketch + 1, got sketch={sketch}, "
                         f"max_hvps={max_hvps}")
    hvps = 0
    ys = []
    for i in range(sketch):
        s = probe_vector(space, seed=seed + SKETCH_SEED_OFFSET, probe_index=i, dtype=dtype)
        ys.append([t.to(dtype) for t in matvec(s)])
        hvps += 1
    q = _orthonormal(ys, space=space)
    del ys
    on_span = 0.0
    for qi in q:
        on_span += space.dot(qi, [t.to(dtype) for t in matvec(qi)])
        hvps += 1
    return _with_samples(matvec, q, on_span, space=space, hvps=hvps, max_hvps=max_hvps, rtol=rtol,
                         min_samples=min_samples, seed=seed, dtype=dtype)


def deflated_trace(matvec: Matvec, *, space: ParamSpace, eigenvalues: Sequence[float], eigenvectors: Sequence[Vector],
                   samples: int, rtol: float = 0.0, min_samples: int = 4, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> TraceEstimate:
    """The trace from known eigenpairs (u_i orthonormal, H u_i = lambda_i u_i: e.g. a run's top-k by magnitude):
    sum_i lambda_i exactly, plus Hutchinson on (I - UU^T) H (I - UU^T), at most ``samples`` HVPs (fewer once
    their standard error is <= ``rtol`` x |trace|). Only the samples are HVPs: the pairs' own cost is the
    caller's (``hvps`` counts the samples)."""
    q = [[t.to(dtype) for t in u] for u in eigenvectors]
    return _with_samples(matvec, q, float(sum(float(x) for x in eigenvalues)), space=space, hvps=0, max_hvps=samples,
                         rtol=rtol, min_samples=min_samples, seed=seed, dtype=dtype)


def _with_samples(matvec: Matvec, q: list[Vector], on_span: float, *, space: ParamSpace, hvps: int, max_hvps: int,
                  rtol: float, min_samples: int, seed: int, dtype: torch.dtype) -> TraceEstimate:
    """``on_span`` plus Hutchinson samples P g^T (I - QQ^T) H (I - QQ^T) g until ``rtol`` or ``max_hvps``."""
    n = space.numel
    samples: list[float] = []
    stopped = "max_hvps"
    while hvps < max_hvps:
        g = probe_vector(space, seed=seed + SAMPLE_SEED_OFFSET, probe_index=len(samples), dtype=dtype)
        if q:
            coeffs = space.dots([(qi, g) for qi in q]).tolist()
            for c, qi in zip(coeffs, q):
                torch._foreach_add_(g, qi, alpha=-c)
        samples.append(n * space.dot(g, [t.to(dtype) for t in matvec(g)]))
        hvps += 1
        if rtol > 0 and len(samples) >= max(min_samples, 2):
            mean = sum(samples) / len(samples)
            if _stderr(samples) <= rtol * abs(on_span + mean):
                stopped = "rtol"
                break
    mean = sum(samples) / len(samples) if samples else 0.0
    return TraceEstimate(trace=on_span + mean, stderr=_stderr(samples), sketch_trace=on_span, sketch=len(q),
                         samples=samples, hvps=hvps, stopped=stopped)


def hutchinson(matvec: Matvec, *, space: ParamSpace, samples: int, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> TraceEstimate:
    """Plain Hutchinson with unit Rademacher vectors (P v^T H v a sample), one HVP each: the reference Hutch++ is
    compared with at the same HVP count."""
    values = [space.numel * space.dot(v, [t.to(dtype) for t in matvec(v)])
              for v in (probe_vector(space, seed=seed + SAMPLE_SEED_OFFSET, probe_index=i, dtype=dtype)
                        for i in range(samples))]
    return TraceEstimate(trace=sum(values) / len(values), stderr=_stderr(values), sketch_trace=0.0, sketch=0,
                         samples=values, hvps=samples, stopped="samples")


def _stderr(values: Sequence[float]) -> float:
    k = len(values)
    if k < 2:
        return math.nan
    mean = sum(values) / k
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (k - 1) / k)
