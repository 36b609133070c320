"""The public entry point: ``analyze(model, batches) -> SpectrumResult``, usable inside a training loop.

``analyze`` runs stochastic Lanczos quadrature (and optionally the block-diagonal analysis and per-block
spectra) on a plain or FSDP2-sharded model, in any program (a notebook, torchrun, a training loop), and
leaves the model exactly as it found it: each module's training flag, every parameter's ``.grad`` (the
same tensor objects, untouched), ``requires_grad`` flags, the parameters bitwise, each module's ``forward``,
and the torch / CUDA / Python / NumPy RNG states. Dropout is off only while it measures, and a float64 model's
RMSNorm, MoE routers and attention compute in float64 only while it measures (``numerics.float64_numerics``,
the fixes the CLI applies to the models it loads).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .block_spectra import block_space, block_spectrum
from .blocks import BlockMetrics, block_diagonal_metrics, parameter_blocks
from .eps import EpsChoice, calibrate_eps
from .hvp import FiniteDifferenceHVP
from .lanczos import LanczosResult, lanczos
from .loss import Batch, LossFn, evaluate_loss
from .numerics import float64_numerics
from .quadrature import Density, RitzRule, SpectralMeasure, block_densities, ritz_rule, smoothed_density, summarize
from .sharding import reshard
from .statistics import SpectrumStatistics, spectrum_statistics
from .vectors import ParamSpace, probe_vector

ParamFilter = Callable[[str, nn.Parameter], bool]


@dataclass(frozen=True, kw_only=True)
class SpectrumResult:
    """What ``analyze`` measured. Eigenvalues are of the Hessian of the analysis loss (see hessian_core.loss).

    ``ritz``: one Gauss quadrature rule per probe (Ritz values ascending, weights summing to 1, residual
    bounds); ``lanczos``: the tridiagonals they come from. ``statistics``: bulk, outliers and negative mass
    (hessian_core.statistics). ``blocks``: one BlockMetrics per block probe (``blocks=True``), whose
    ``whole_rel_error`` is the relative error of the whole block-diagonal approximation of H v.
    ``block_ritz``: per block name, one rule per probe of H_bb (``block_spectra=True``).
    """

    lambda_max: float
    lambda_min: float
    lambda_max_residual: float
    lambda_min_residual: float
    trace: float
    trace_stderr: float
    ritz: list[RitzRule]
    lanczos: list[LanczosResult]
    statistics: SpectrumStatistics
    eps: float
    eps_choice: EpsChoice | None  # None for a fixed eps without assessment
    loss: float
    num_params: int
    param_names: list[str]
    hvp_count: int
    seconds: float
    blocks: list[BlockMetrics] = field(default_factory=list)
    block_ritz: dict[str, list[RitzRule]] = field(default_factory=dict)
    block_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def measure(self) -> SpectralMeasure:
        """The probe-averaged SLQ measure (atoms at Ritz values, weights summing to 1)."""
        return SpectralMeasure.from_rules(self.ritz)

    def density(self, *, grid_size: int = 1000) -> Density:
        return smoothed_density(self.measure, grid_size=grid_size)

    def block_densities(self, *, grid: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
        """Each block's density on ``grid`` scaled by its share of the parameters (``quadrature.block_densities``:
        the same computation as a run's blocks overlay in density.png)."""
        return block_densities(self.block_ritz, self.block_sizes, grid=grid, sigma=sigma)

    @property
    def whole_block_rel_error(self) -> float:
        """Mean over block probes of |sum_b H v_b restricted to b - H v| / |H v| (nan without ``blocks``)."""
        return float(np.mean([m.whole_rel_error for m in self.blocks])) if self.blocks else float("nan")

    def summary(self) -> dict:
        """The scalars, one row of a curvature time series."""
        s = self.statistics
        return {"lambda_max": self.lambda_max, "lambda_min": self.lambda_min, "trace": self.trace,
                "trace_stderr": self.trace_stderr, "negative_mass": s.negative_mass, "bulk_lower": s.bulk_lower,
                "bulk_upper": s.bulk_upper, "outlier_count": s.outlier_count, "outlier_mass": s.outlier_mass,
                "whole_block_rel_error": self.whole_block_rel_error, "loss": self.loss, "eps": self.eps,
                "num_params": self.num_params, "hvp_count": self.hvp_count, "seconds": self.seconds}

    def to_arrow(self):
        """The Ritz rules as a pyarrow Table: probe_id int32, value, weight, residual (float64)."""
        import pyarrow as pa

        ids = np.concatenate([np.full(len(r.values), k, dtype=np.int32) for k, r in enumerate(self.ritz)])
        return pa.table({"probe_id": ids, "value": np.concatenate([r.values for r in self.ritz]),
                         "weight": np.concatenate([r.weights for r in self.ritz]),
                         "residual": np.concatenate([r.residuals for r in self.ritz])})

    def block_ritz_arrow(self):
        """Per-block rules as a pyarrow Table: block, probe_id, value, weight, block_size (``block_ritz.parquet``)."""
        import pyarrow as pa

        rows = [(name, k, float(v), float(w), self.block_sizes[name]) for name, rules in self.block_ritz.items()
                for k, r in enumerate(rules) for v, w in zip(r.values, r.weights)]
        names, ids, values, weights, sizes = zip(*rows) if rows else ((), (), (), (), ())
        return pa.table({"block": pa.array(names, pa.string()), "probe_id": pa.array(ids, pa.int32()),
                         "value": pa.array(values, pa.float64()), "weight": pa.array(weights, pa.float64()),
                         "block_size": pa.array(sizes, pa.int64())})


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no ``.grad``, grad mode on and float64 numerics (``float64_numerics``) inside; training flags,
    the ``.grad`` tensors, ``requires_grad``, every ``forward`` and every RNG state exactly restored on exit
    (also on an exception)."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    restore_forwards = float64_numerics(model)
    try:
        for p in params:
            p.grad = None  # the FD passes start from zero gradients; the training step's are kept aside
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        reshard(model)
        restore_forwards()
        for p, g, flag in zip(params, grads, flags):
            p.grad = g
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def _space(model: nn.Module, param_filter: ParamFilter | None) -> ParamSpace:
    space = ParamSpace(model)
    if param_filter is None:
        return space
    named = dict(model.named_parameters())
    keep = [i for i, n in enumerate(space.names) if param_filter(n, named[n])]
    if not keep:
        raise ValueError("param_filter selected no trainable parameter")
    return block_space(space, keep)


def _choose_eps(op: FiniteDifferenceHVP, eps: float | str, *, seed: int, assess: bool) -> EpsChoice | None:
    if eps != "auto" and not assess:
        return None
    v = probe_vector(op.space, seed=seed, probe_index=0, dtype=torch.float64)
    return calibrate_eps(op, v, eps=None if eps == "auto" else float(eps))


def calibrated_operator(model: nn.Module, batches, *, space: ParamSpace, eps: float | str, scheme: str,
                        loss_fn: LossFn | None, seed: int, assess: bool) -> tuple[FiniteDifferenceHVP, EpsChoice | None,
                                                                                 float]:
    """(the FD HVP operator at the chosen eps, the choice (None for a fixed eps not assessed), the analysis loss at
    theta): what ``analyze`` and ``eigenpairs`` start from, inside ``preserved_state``."""
    op = FiniteDifferenceHVP(model, batches, eps=1.0 if eps == "auto" else float(eps), scheme=scheme, space=space,
                             loss_fn=loss_fn)
    choice = _choose_eps(op, eps, seed=seed, assess=assess)
    op = op.with_eps(choice.eps) if choice is not None else op
    return op, choice, evaluate_loss(model, op.batches, space=space, loss=op.loss)


def _checked_eps(eps: float | str) -> float | str:
    """``"auto"`` or a finite positive step, refused before any compute otherwise (inf or nan would fail deep
    inside Lanczos)."""
    if isinstance(eps, str) and eps == "auto":
        return eps
    try:
        value = float(eps)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be 'auto' or a finite number > 0, got {eps!r}")
    return value


def _capped_steps(steps: int, dimension: int) -> int:
    """At most ``dimension`` steps: a Krylov space has no more dimensions, so further steps only add ghosts and
    a tridiagonal whose eigenvectors can need more memory than the machine has."""
    if steps <= dimension:
        return steps
    warnings.warn(f"steps={steps} exceeds the {dimension} parameters analysed; running {dimension} Lanczos steps "
                  f"per probe, the most there can be", stacklevel=3)
    return dimension


def analyze(model: nn.Module, batches: Sequence[Batch | Mapping[str, torch.Tensor]], *, loss_fn: LossFn | None = None,
            probes: int = 4, steps: int = 30, eps: float | str = "auto", seed: int = 0, scheme: str = "central",
            reorth: str = "window", window: int = 8, vector_dtype: torch.dtype | None = None,
            param_filter: ParamFilter | None = None, assess_eps: bool = False, blocks: bool = False,
            block_probes: int = 1, block_spectra: bool = False, block_steps: int | None = None) -> SpectrumResult:
    """The Hessian spectrum of the analysis loss at the model's current parameters, by SLQ over FD HVPs.

    model: a Hugging Face-style causal LM (``model(input_ids=..., attention_mask=...).logits``), plain or
        FSDP2-sharded (``fully_shard`` per block, then the root). In train or eval mode, with or without
        accumulated gradients: all of that is restored (see ``preserved_state``). Under FSDP2 every rank
        calls ``analyze`` together with its own batches, as in training.
    batches: ``input_ids`` tensors [batch, seq_len], or dicts with ``input_ids`` and optional
        ``attention_mask`` (0 = padding) and ``labels`` (-100 = ignored), on the model's device.
    loss_fn: ``loss_fn(model, batch) -> scalar``; the analysis loss is then its mean over the batches (and
        ranks). Default: next-token cross-entropy, the mean over the counted tokens of the whole set.
    probes, steps: SLQ probes (Rademacher, unit norm, a pure function of ``seed``) and Lanczos steps each;
        ``steps`` above the number of parameters analysed is capped to it, with a warning.
    eps: the FD step (finite, > 0), or ``"auto"`` (Theorem 3.1, ~1 gradient + 2-6 HVPs); ``assess_eps`` also
        estimates a fixed eps's error. scheme: ``central`` (2 gradient passes per HVP), ``richardson`` (4) or
        ``forward`` (1, reusing the gradient at theta; O(eps) error, its own eps rule: docs/precision.md).
    reorth, window, vector_dtype: Lanczos reorthogonalization (``none``, ``window``, ``full``) and the storage
        dtype of its vectors (default: float64 for float64 parameters, else float32).
    param_filter: ``(name, parameter) -> bool`` restricts the analysis to those trainable parameters (the
        Hessian block over them); the default is every parameter with ``requires_grad``.
    blocks: also run the block-diagonal analysis with ``block_probes`` Gaussian probes (1 + B HVPs each).
    block_spectra: also run SLQ on every diagonal block H_bb (``block_probes`` probes x ``block_steps``
        steps each, default ``steps``, capped at the block's size).
    Cost: probes x steps HVPs, each 2 (richardson 4, forward 1) gradient passes over ``batches``, plus the
    options above.
    """
    if probes < 1 or steps < 1 or block_probes < 1:
        raise ValueError(f"probes, steps and block_probes must be >= 1, got {probes}, {steps}, {block_probes}")
    eps = _checked_eps(eps)
    started = time.perf_counter()
    with preserved_state(model):
        space = _space(model, param_filter)
        steps = _capped_steps(steps, space.numel)
        dtype = vector_dtype or (torch.float64 if space.dtype == torch.float64 else torch.float32)
        op, choice, loss = calibrated_operator(model, batches, space=space, eps=eps, scheme=scheme, loss_fn=loss_fn,
                                               seed=seed, assess=assess_eps)
        runs = [lanczos(op.matvec, probe_vector(space, seed=seed, probe_index=k, dtype=dtype), space=space,
                        steps=steps, reorth=reorth, window=window, vector_dtype=dtype) for k in range(probes)]
        block_index = parameter_blocks(model, space) if blocks or block_spectra else {}
        metrics = [block_diagonal_metrics(op.matvec, probe_vector(space, seed=seed, probe_index=k, kind="gaussian",
                                                                  dtype=op.out_dtype), space=space, blocks=block_index)
                   for k in range(block_probes)] if blocks else []
        block_rules = _block_rules(op, block_index, probes=block_probes, seed=seed, steps=block_steps or steps,
                                   reorth=reorth, window=window, dtype=dtype) if block_spectra else {}
        sizes = {name: block_space(space, idx).numel for name, idx in block_index.items()}
    return _result(runs, space=space, op=op, choice=choice, loss=loss, metrics=metrics, block_rules=block_rules,
                   sizes=sizes, seconds=time.perf_counter() - started)


def _block_rules(op: FiniteDifferenceHVP, block_index: dict[str, list[int]], *, probes: int, seed: int, steps: int,
                 reorth: str, window: int, dtype: torch.dtype) -> dict[str, list[RitzRule]]:
    """SLQ of each diagonal block H_bb: ``probes`` Lanczos runs per block."""
    out = {}
    for name, idx in block_index.items():
        runs = [block_spectrum(op.matvec, space=op.space, indices=idx, probe_id=k, seed=seed, steps=steps,
                               reorth=reorth, window=window, vector_dtype=dtype) for k in range(probes)]
        out[name] = [ritz_rule(r.alphas, r.betas) for r in runs]
    return out


def _result(runs: list[LanczosResult], *, space: ParamSpace, op: FiniteDifferenceHVP, choice: EpsChoice | None,
            loss: float, metrics: list[BlockMetrics], block_rules: dict, sizes: dict, seconds: float) -> SpectrumResult:
    rules = [ritz_rule(r.alphas, r.betas) for r in runs]
    s = summarize(rules, dimension=space.numel)
    return SpectrumResult(
        lambda_max=s.lambda_max, lambda_min=s.lambda_min, lambda_max_residual=s.lambda_max_residual,
        lambda_min_residual=s.lambda_min_residual, trace=s.trace, trace_stderr=s.trace_stderr, ritz=rules, lanczos=runs, statistics=spectrum_statistics(rules, dimension=space.numel), eps=op.eps,
        eps_choice=choice, loss=loss, num_params=space.numel, param_names=list(space.names), hvp_count=op.calls,
        seconds=seconds, blocks=metrics, block_ritz=block_rules, block_sizes=sizes)


def append_row(path: str, row: Mapping[str, float | int | str]) -> None:
    """Append one row to a Parquet table (a curvature time series), rewriting it atomically: a crash leaves
    the previous file, never a truncated one. Columns are the union of the rows' keys."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .files import atomic_write

    rows = pq.read_table(path).to_pylist() if os.path.exists(path) else []
    rows.append(dict(row))
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
