"""The rank-side part of the package's own tasks (``actors.records``): each function runs on every rank of a
group at once, ``ctx`` being the rank (``actors.worker.Worker``); rank 0's return value is the group's. Each
takes the task record that calls it (``task``: the record in ``actors.records`` whose ``run`` calls it), which this
module never imports: the records depend on this code, not the other way round."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from hessian_core import (LanczosState, accumulate_gradient, block_diagonal_metrics, calibrate as choose_eps,
                          lanczos, latest_complete_step, load_lanczos_state, parameter_blocks, probe_vector)
from hessian_core.block_spectra import block_spectrum
from hessian_core.checkpoint import CheckpointWriter
from hessian_core.convergence import ProbeStopRule
from hessian_core.models import DTYPES

from .results import (ApproximationResult, BlockResult, BlockSpectrumResult, Calibration, EigenpairsResult,
                      KernelTiming, ProbeResult, ProgressEvent, TraceResult)
from .worker import CheckpointSchedule


def calibrate(ctx, task) -> Calibration:
    """Choose (or assess a fixed) eps along the probe's start vector, then keep the HVP at that eps there: it
    is the probe's first Lanczos matvec when the probe runs next on this group. ``assess=False`` (a fixed
    eps taken as it is) only times one gradient."""
    probe, fixed_eps = task.probe, task.fixed_eps
    if not task.assess:
        return Calibration(eps=fixed_eps, source="fixed", relative_error=None, grad_norm=None,
                           third_derivative=None, perturbation_rounding=None, reliable=None,
                           message=f"eps={fixed_eps:.3g} (fixed, not assessed: hvp.assess is false)",
                           grad_seconds=gradient_seconds(ctx, repeats=1, warmup=False))
    op = ctx.operator(1.0 if fixed_eps is None else fixed_eps, probe.scheme, probe.placement.restore)
    start = ctx.start_vector(seed=probe.seed, probe_id=probe.probe_id, vector_dtype=probe.vector_dtype)
    q0 = start.vector(start.rows[0])
    calls = op.calls
    calibrated = choose_eps(op, q0, eps=fixed_eps, compute_dtype=ctx.compute_dtype)
    choice, hv, seconds = calibrated.choice, calibrated.hvp, calibrated.hvp_seconds
    op = ctx.operator(choice.eps, probe.scheme, probe.placement.restore)
    if hv is None:  # the chosen eps is none of the ladder's steps: one more HVP, kept all the same
        hv, seconds = ctx.timed(op.matvec, q0)
    ctx.keep_matvec((probe.probe_id, probe.seed, probe.vector_dtype, choice.eps, probe.scheme), hv, seconds)
    return Calibration(**choice.as_dict(), hvp_count=op.calls - calls, first_matvec_kept=True)


def gradient_seconds(ctx, *, repeats: int, warmup: bool = True) -> float:
    """Median wall time of one full gradient over this group's analysis set."""
    times = []
    for _ in range(repeats + int(warmup)):
        times.append(ctx.timed(accumulate_gradient, ctx.model, ctx.batches)[1])
        ctx.model.zero_grad(set_to_none=True)
    return statistics.median(times[int(warmup):])


def run_probe(ctx, task) -> ProbeResult:
    """One probe's whole Lanczos run, continued from its newest complete checkpoint when there is one whose
    metadata matches (written by a group of any size); returns alpha, beta and this call's timings. The operator
    is the Hessian's FD HVP, or (``task.operator``) the Gauss-Newton matrix or H - G."""
    op = ctx.curvature(task.operator, task.eps, task.scheme, task.placement.restore)
    hvp_seconds: list[float] = []
    step_seconds: list[float] = []
    meta = {**task.checkpoint_meta, "probe_id": task.probe_id, "eps": task.eps}
    state, resumed_at = _resume(ctx, task, meta)
    kept = (ctx.take_kept_matvec((task.probe_id, task.seed, task.vector_dtype, task.eps, task.scheme))
            if state is None and task.operator == "hessian" else None)

    def timed_matvec(v):
        nonlocal kept
        if kept is not None:  # bitwise what op.matvec(v) gives: the same vector, eps and parameters
            (out, seconds), kept = kept, None
            hvp_seconds.append(seconds)
            return out
        out, seconds = ctx.timed(op.matvec, v)
        hvp_seconds.append(seconds)
        return out

    reused = kept is not None
    writer = (CheckpointWriter(task.checkpoint_dir, space=ctx.space, rank=ctx.rank, world_size=ctx.world_size,
                               meta=meta) if task.checkpoint_dir and task.checkpoint_every else None)
    schedule = CheckpointSchedule(task.checkpoint_every, agree=ctx.agree_max)
    checkpoint_seconds: list[float] = []
    last = 0.0
    progress = ctx.progress

    def on_step(state):
        nonlocal last
        now = time.perf_counter()
        step_seconds.append(now - last)
        done = state.steps_done
        if writer is not None and done < task.steps and not state.stopped and schedule.due(done):
            checkpoint_seconds.append(writer.save(state))
            schedule.saved(done, checkpoint_seconds[-1], step_seconds)
        if progress is not None and ctx.rank == 0:
            progress(ProgressEvent(probe_id=task.probe_id, step=done, steps=task.steps, hvp_seconds=hvp_seconds[-1]))
        last = time.perf_counter()  # step times exclude checkpoint staging (reported apart)

    v0 = None if state is not None else ctx.probe(seed=task.seed, probe_id=task.probe_id,
                                                  vector_dtype=task.vector_dtype)
    last = time.perf_counter()  # the first step's time excludes drawing the probe or loading a checkpoint
    try:
        result = lanczos(timed_matvec, v0, space=ctx.space, steps=task.steps, reorth=task.reorth,
                         window=task.window, vector_dtype=DTYPES[task.vector_dtype], state=state, on_step=on_step,
                         vectors=task.placement.vectors,
                         stop=ProbeStopRule(tol=task.stop_tol) if task.stop_tol is not None else None)
    except FloatingPointError as e:
        raise FloatingPointError(f"probe {task.probe_id}: {e}") from None
    finally:
        if writer is not None:
            writer.close()
    return ProbeResult(probe_id=task.probe_id, alphas=result.alphas.tolist(), betas=result.betas.tolist(),
                       stopped=result.stopped, hvp_seconds=hvp_seconds, step_seconds=step_seconds,
                       checkpoint_seconds=checkpoint_seconds, resumed_at_step=resumed_at, reused_first_matvec=reused)


def _resume(ctx, task, meta: dict) -> tuple[LanczosState | None, int]:
    """The newest complete checkpoint of this probe with matching metadata (any writer world size)."""
    found = latest_complete_step(task.checkpoint_dir) if task.checkpoint_dir else None
    if found is None or {k: found[1].get(k) for k in meta} != meta:
        return None, 0
    state = load_lanczos_state(task.checkpoint_dir, step=found[0], space=ctx.space, device=ctx.device,
                               vectors=task.placement.vectors)
    return state, found[0]


def run_blocks(ctx, task) -> BlockResult:
    op = ctx.operator(task.eps, task.scheme, task.placement.restore)
    blocks = parameter_blocks(ctx.model, ctx.space)
    v = probe_vector(ctx.space, seed=task.seed, probe_index=task.probe_id, kind="gaussian", dtype=op.out_dtype)
    m = block_diagonal_metrics(op.matvec, v, space=ctx.space, blocks=blocks)
    return BlockResult(probe_id=task.probe_id, blocks=m.blocks, rel_error=m.rel_error, cosine=m.cosine,
                       whole_rel_error=m.whole_rel_error, hvp_count=1 + len(blocks))


def run_approximations(ctx, task) -> ApproximationResult:
    """One probe of the approximation study (actors.records.ApproximationTask) on this rank."""
    from hessian_core.approximations import (approximation_metrics, block_residual_operator, lowrank_ranks,
                                             parse_approximation)
    from hessian_core.eigen import thick_restart_lanczos

    started = time.perf_counter()
    op = ctx.operator(task.eps, task.scheme, task.placement.restore)
    calls = op.calls
    blocks = parameter_blocks(ctx.model, ctx.space)
    ranks = lowrank_ranks(task.approximations)
    lowrank_hvps = 0
    pairs = {}
    solves = {}
    for kind, k in ranks.items():
        key = ("lowrank", kind, k, task.eps, task.scheme, task.eigen_tol, task.eigen_max_hvps, task.eigen_seed)
        found = ctx.memo_get(key)
        if found is None:
            before = op.calls
            matvec = op.matvec if kind == "lowrank" else block_residual_operator(op.matvec, blocks=blocks)
            solved = thick_restart_lanczos(matvec, space=ctx.space, k=k, which="LM", tol=task.eigen_tol,
                                           max_hvps=task.eigen_max_hvps, vector_dtype=DTYPES[task.vector_dtype],
                                           seed=task.eigen_seed)
            found = (solved.eigenvalues.tolist(), solved.eigenvectors)
            ctx.memo_put(key, found)
            lowrank_hvps += op.calls - before
            solves[kind] = {"k": k, "eigenvalues": found[0], "converged": int(sum(solved.converged)),
                            "hvps": op.calls - before, "stopped": solved.stopped}
        pairs[kind] = found
    gn = ctx.gauss_newton(task.eps) if any(parse_approximation(n)[0] == "gauss_newton"
                                           for n in task.approximations) else None
    gn_calls = gn.calls if gn is not None else 0
    v = probe_vector(ctx.space, seed=task.seed, probe_index=task.probe_id, kind="gaussian", dtype=op.out_dtype)
    metrics = approximation_metrics(op.matvec, v, space=ctx.space, blocks=blocks, approximations=task.approximations,
                                    lowrank=pairs.get("lowrank"),
                                    residual_lowrank=pairs.get("block_diagonal_plus_lowrank"),
                                    gauss_newton=gn.matvec if gn is not None else None)
    rows: dict[str, list] = {"approximations": [], "blocks": [], "rel_error": [], "cosine": [],
                             "whole_rel_error": [], "whole_cosine": []}
    for name in task.approximations:
        m = metrics[name]
        for block, rel, cos in zip(m.blocks, m.rel_error, m.cosine):
            rows["approximations"].append(name)
            rows["blocks"].append(block)
            rows["rel_error"].append(rel)
            rows["cosine"].append(cos)
            rows["whole_rel_error"].append(m.whole_rel_error)
            rows["whole_cosine"].append(m.whole_cosine)
    return ApproximationResult(probe_id=task.probe_id, **rows, hvp_count=op.calls - calls,
                               gauss_newton_products=(gn.calls - gn_calls) if gn is not None else 0,
                               lowrank_hvps=lowrank_hvps,
                               lowrank_solves=solves,
                               seconds=time.perf_counter() - started)


def run_trace(ctx, task) -> TraceResult:
    """The trace task (actors.records.TraceTask: Hutch++ or deflated) on this rank's FD operator."""
    from hessian_core.eigen import thick_restart_lanczos
    from hessian_core.trace import deflated_trace, hutchpp

    started = time.perf_counter()
    op = ctx.operator(task.eps, task.scheme, task.placement.restore)
    dtype = DTYPES[task.vector_dtype]
    if task.estimator == "hutchpp":
        est = hutchpp(op.matvec, space=ctx.space, sketch=task.sketch, max_hvps=task.max_hvps, rtol=task.rtol,
                      seed=task.seed, dtype=dtype)
    else:  # the pairs may take half the budget; the samples the rest
        calls = op.calls
        pairs = thick_restart_lanczos(op.matvec, space=ctx.space, k=task.sketch, which="LM", tol=task.eigen_tol,
                                      max_hvps=task.max_hvps // 2, vector_dtype=dtype, seed=task.seed)
        spent = op.calls - calls
        est = deflated_trace(op.matvec, space=ctx.space, eigenvalues=pairs.eigenvalues.tolist(),
                             eigenvectors=pairs.eigenvectors, samples=task.max_hvps - spent, rtol=task.rtol,
                             seed=task.seed, dtype=dtype)
        est = dataclasses.replace(est, hvps=est.hvps + spent)
    return TraceResult(trace=est.trace, stderr=est.stderr, sketch_trace=est.sketch_trace, sketch=est.sketch,
                       samples=list(est.samples), hvps=est.hvps, stopped=est.stopped,
                       seconds=time.perf_counter() - started)


def run_block_spectrum(ctx, task) -> BlockSpectrumResult:
    """One SLQ probe of the diagonal block ``task.block`` (hessian_core.block_spectra)."""
    blocks = parameter_blocks(ctx.model, ctx.space)
    if task.block not in blocks:
        raise ValueError(f"block {task.block!r} is not a block of this model; blocks: {', '.join(blocks)}")
    op = ctx.operator(task.eps, task.scheme, task.placement.restore)
    calls = op.calls
    idx = blocks[task.block]
    run = block_spectrum(op.matvec, space=ctx.space, indices=idx, probe_id=task.probe_id, seed=task.seed,
                         steps=task.steps, reorth=task.reorth, window=task.window,
                         vector_dtype=DTYPES[task.vector_dtype], vectors=task.placement.vectors)
    return BlockSpectrumResult(block=task.block, probe_id=task.probe_id,
                               block_size=sum(ctx.space.shards[i].global_shape.numel() for i in idx),
                               alphas=run.alphas.tolist(), betas=run.betas.tolist(), stopped=run.stopped,
                               hvp_count=op.calls - calls)


def hvp_errors(ctx, task):
    """The FD HVP along probe 0 at every eps, against the exact HVP and the most stable FD (hessian_core.eps)."""
    from hessian_core.eps import hvp_error_study

    op = ctx.operator(task.eps_values[0], task.scheme)
    v = probe_vector(ctx.space, seed=task.seed, probe_index=0, dtype=torch.float64)
    reference = ctx.float64_copy() if ctx.world_size == 1 else None
    return hvp_error_study(op, v, eps_values=task.eps_values, compute_dtype=ctx.compute_dtype,
                           reference_model=reference)


def kernel_timings(ctx, task) -> list[KernelTiming]:
    """Kernel timings and peak memory on this group (see hessian_core.profiling)."""
    from hessian_core.profiling import measure_kernels

    rows = measure_kernels(ctx.model, ctx.batches, eps=task.eps, repeats=task.repeats, window=task.window,
                           vector_dtype=DTYPES[task.vector_dtype])
    return [KernelTiming(**row) for row in rows]


def run_eigen(ctx, task) -> EigenpairsResult:
    """The eigen task (actors.records.EigenTask) on this rank: thick-restart Lanczos on the rank's FD operator at
    the run's eps, continued from the newest complete state in ``task.checkpoint_dir`` whose metadata matches
    (written by a group of any size) and saved there after every restart; then each eigenvalue's FD bar (2k
    HVPs), the gradient fraction (one gradient), the eigen mass, the landscape slices (one forward a point) and
    the eigenvectors (a sharded DCP folder). Every step is a collective: all ranks run it together."""
    import math

    import numpy as np

    from hessian_core import eigen_mass, gradient_fraction, landscape_1d, landscape_2d, thick_restart_lanczos
    from hessian_core.eigen_api import roundoff_coefficient, with_fd_bars
    from hessian_core.eigen_checkpoint import save_eigen_state, save_eigenvectors
    from hessian_core.eigen_measures import landscape_grid, landscape_range

    started = time.perf_counter()
    op = ctx.operator(task.eps, task.scheme, task.placement.restore)
    calls = op.calls
    meta = {**task.checkpoint_meta, "eps": task.eps, "scheme": task.scheme, "k": task.k, "which": task.which,
            "vector_dtype": task.vector_dtype}
    state = _resume_eigen(ctx, task, meta)
    resumed_at = (state.restarts, state.hvps) if state is not None else (0, 0)

    def save(s):
        if task.checkpoint_dir:
            save_eigen_state(s, folder=task.checkpoint_dir, space=ctx.space, rank=ctx.rank,
                             world_size=ctx.world_size, meta=meta)

    solver_started = time.perf_counter()
    try:
        result = thick_restart_lanczos(op.matvec, space=ctx.space, k=task.k, which=task.which, tol=task.tol,
                                       max_hvps=task.max_hvps, basis=task.basis,
                                       vector_dtype=DTYPES[task.vector_dtype], seed=task.seed, state=state,
                                       on_restart=save)
    except FloatingPointError as e:
        raise FloatingPointError(f"eigenpairs: {e}") from None
    solver_seconds = time.perf_counter() - solver_started
    del state
    fraction = gradient_fraction(ctx.model, ctx.batches, result, space=ctx.space)
    roundoff = task.roundoff
    if roundoff is None or not math.isfinite(roundoff):
        roundoff = roundoff_coefficient(fraction.grad_norm, ctx.compute_dtype)
    result = with_fd_bars(result, op, roundoff=roundoff)
    mass = eigen_mass(result, model=ctx.model)
    values = result.eigenvalues
    vectors = result.eigenvectors

    def half_width(i: int) -> float:
        return task.landscape_range or landscape_range(float(values[i]), fraction.loss)

    ts = landscape_grid(task.landscape_points_1d, half_width(0)) if task.landscape_points_1d else np.zeros(0)
    losses = (landscape_1d(ctx.model, ctx.batches, vectors[0], ts, space=ctx.space) if ts.size
              else np.zeros(0))
    grid_s = grid_t = np.zeros(0)
    grid = np.zeros((0, 0))
    if task.landscape_points_2d and len(vectors) >= 2:
        grid_s = landscape_grid(task.landscape_points_2d, half_width(0))
        grid_t = landscape_grid(task.landscape_points_2d, half_width(1))
        grid = landscape_2d(ctx.model, ctx.batches, vectors[0], vectors[1], grid_s, grid_t, space=ctx.space)
    if task.vectors_dir:
        save_eigenvectors(vectors, space=ctx.space, folder=task.vectors_dir)
    bars = result.error_bars
    return EigenpairsResult(
        k=result.k, which=result.which, tol=result.tol, eps=op.eps, eigenvalues=values.tolist(),
        residuals=result.residuals.tolist(), converged=[bool(c) for c in result.converged],
        fd_bounds=[b.fd_bound for b in bars], errors=[b.total for b in bars],
        rayleigh_eps=result.rayleigh_eps.tolist(), rayleigh_2eps=result.rayleigh_2eps.tolist(), roundoff=roundoff,
        norm_estimate=result.norm_estimate, hvps=result.hvps, restarts=result.restarts, stopped=result.stopped,
        hvp_count=op.calls - calls, resumed_at_restart=resumed_at[0], resumed_at_hvps=resumed_at[1],
        mass_tensors=mass.tensors, mass_blocks=mass.blocks, mass_block_of=mass.block_of,
        mass_per_tensor=mass.per_tensor.tolist(), mass_per_block=mass.per_block.tolist(),
        gradient_fraction=fraction.fraction, gradient_per_vector=fraction.per_vector.tolist(),
        grad_norm=fraction.grad_norm, loss=fraction.loss, landscape_t=ts.tolist(), landscape_loss=losses.tolist(),
        landscape_2d_s=grid_s.tolist(), landscape_2d_t=grid_t.tolist(), landscape_2d_loss=grid.tolist(),
        vectors_saved=bool(task.vectors_dir), seconds=time.perf_counter() - started, solver_seconds=solver_seconds)


def _resume_eigen(ctx, task, meta: dict):
    """The newest complete eigen state in the task's checkpoint folder with matching metadata (any writer world
    size), laid out for this rank; None if there is none."""
    from hessian_core.eigen_checkpoint import latest_eigen_state, load_eigen_state

    found = latest_eigen_state(task.checkpoint_dir) if task.checkpoint_dir else None
    if found is None or {k: found[1].get(k) for k in meta} != meta:
        return None
    return load_eigen_state(found[0], space=ctx.space, device=ctx.device)
