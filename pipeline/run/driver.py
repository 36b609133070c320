"""One analysis run: the prepared config, a Ray connection, a scheduler over the groups, the eps policy, and a
recorder of everything that finishes. Each piece is its own module; this one only puts them in order."""

from __future__ import annotations

import threading

from actors.records import (ApproximationResult, ApproximationTask, BlockResult, BlockSpectrumResult,
                            BlockSpectrumTask, BlockTask, Calibration, CalibrationTask, EigenpairsResult, EigenTask,
                            Placement, ProbeResult, ProbeTask, TraceResult, TraceTask)

from hessian_core.error_bars import WIDE_BAR_FRACTION, wide_bars

from . import handlers
from .eps_policy import calibration_task, known_calibration
from .handlers import ResultHandling, RunContext
from .output_lock import LockLost, ensure_held
from .preflight import Prepared, model_spec, preflight
from .probe_policy import ProbesPolicy
from .progress import Progress, log, set_run_name
from .ray_connection import connect_ray, stop_ray
from .ray_groups import GroupPool, RayGroups
from .recorder import Recorder, block_summary, draw_plots
from .recording import RecordingListener
from .scheduler import Scheduler, SchedulerSettings
from .signals import Interrupted, as_interrupted, signal_of

BLOCK_SEED_OFFSET = 1_000_003  # block probes are Gaussian and drawn from their own seed stream
BLOCK_SPECTRA_SEED_OFFSET = 2_000_003  # and the per-block SLQ probes from another
EIGEN_SEED_OFFSET = 3_000_003  # and the eigen task's start vector (Gaussian) from a third
APPROXIMATION_SEED_OFFSET = 4_000_003  # the approximation study's probes (Gaussian)
APPROXIMATION_EIGEN_SEED_OFFSET = 5_000_003  # and its low-rank eigenpairs' start vectors
TRACE_SEED_OFFSET = 6_000_003  # the Hutch++ task's sketch and samples


def run(prepared: Prepared, *, name: str | None = None, own_ray: bool = True,
        cancel: threading.Event | None = None, pool: GroupPool | None = None) -> dict:
    """Execute a prepared run; returns run.json's content. Raises on failure after recording it.

    ``own_ray=False``: a sweep's point, run in a thread on the sweep's Ray; ``own_ray=True`` connects to Ray
    and shuts it down before the finish, unless this process was already connected (``connect_ray``);
    ``name`` then tags this run's log lines; setting ``cancel`` stops the run at its next poll, as an
    interruption that keeps its checkpoints; ``pool`` (a sweep's) lends formed groups of an earlier point and
    keeps this run's idle ones at its end. A resumed run whose tasks are all finished goes straight to its
    finish (summary, density, plots, ``complete``): no Ray, no group, no model load.
    """
    from hessian_core.models import parameter_count

    set_run_name(name)
    recorder = Recorder(prepared)
    recorder.save_info()
    try:
        # on the meta device, before any group (the preflight counted them already where eigen.k needed them)
        recorder.set_num_params(prepared.num_params or parameter_count(model_spec(prepared)))
        calibration = known_calibration(prepared.config, recorder)
        if calibration is not None and not unfinished_tasks(prepared, recorder, eps=calibration.eps):
            log("every task of this run is finished: writing its results")
            failures = recorder.info.get("worker_failures_recovered", 0)
        else:
            failures = _compute(prepared, recorder, calibration, name=name, own_ray=own_ray, cancel=cancel,
                                pool=pool)
        recorder.complete(failures_recovered=failures)
        return recorder.info
    except KeyboardInterrupt as err:
        recorder.interrupted(signal_of(err))
        raise
    except LockLost:  # another run owns the output_dir now, run.json included: record nothing
        raise
    except BaseException as err:
        recorder.failed(err)
        raise


def _compute(prepared: Prepared, recorder: Recorder, calibration: Calibration | None, *, name: str | None,
             own_ray: bool, cancel: threading.Event | None, pool: GroupPool | None = None) -> int:
    """The unfinished tasks on the groups; returns the group failures recovered. The run's Ray objects are all
    released, and Ray (when this run started it) shut down, here and in this thread, before the finish begins:
    nothing runs beside ``ray.shutdown`` that could touch Ray while it tears the core worker down."""
    import ray

    scheduler = progress = None
    started_ray = False  # this run connected Ray, and shuts it down
    stopped = False  # a signal or the sweep asked the run to stop: its groups are killed, not drained
    try:
        verdict = _plan_verdict(prepared) if name is None else None  # a sweep's points share one
        started_ray = connect_ray(prepared.config) if own_ray else False
        if verdict is not None:
            line, plan = verdict
            log(line)  # after Ray is up: a refused cluster.address stays a one-line error
        else:
            plan = None
        _choose_placement(prepared.config, plan, recorder)
        cl = prepared.config.cluster
        if pool is None and cl.keep_groups and not started_ray:  # a Ray this run starts, it stops: nothing to keep
            pool = GroupPool.for_this_session()
        log(f"requesting {cl.num_groups} group(s) x {cl.num_workers} worker(s) (at least {prepared.config.min_groups()} "
            f"alive)")
        policy = probes_policy(prepared, recorder)
        progress = Progress(_remaining_steps(prepared, recorder), bar=own_ray)
        scheduler = ray_scheduler(prepared, recorder, batches_ref=ray.put(prepared.batches), progress=progress,
                                  cancel=cancel, own_ray=own_ray, pool=pool, policy=policy)
        recorder.phase("load")
        if calibration is None:
            scheduler.submit([calibration_task(prepared.config, probe_task(prepared, recorder, 0, eps=0.0))])
        else:
            _use_calibration(calibration, prepared, recorder, scheduler, policy)
        scheduler.run()
        return scheduler.failures
    except (KeyboardInterrupt, LockLost):  # stopped by a signal, the sweep, or another run's takeover
        stopped = True
        raise
    finally:
        try:
            if progress is not None:
                progress.close()
            if scheduler is not None:
                scheduler.shutdown(graceful=not (stopped or (cancel is not None and cancel.is_set())))
        finally:  # Ray goes down even when a signal cut the groups' shutdown short
            scheduler = None
            if started_ray:
                stop_ray()


def _plan_verdict(prepared: Prepared) -> tuple:
    """(the plan's one-line verdict, the plan or None): its fake-tensor trace takes about a second, computed here
    in the run's own thread before Ray starts: no thread builds a model beside the run
    (``hessian_core.models.build``)."""
    from .plan import run_plan

    return run_plan(prepared.config, model_path=prepared.model_path)


def _choose_placement(config, plan, recorder: Recorder) -> None:
    """Where the ranks keep their Lanczos vectors and restore copy: the config's values, ``auto`` as the plan
    resolved it (device where there is no plan: a sweep's point, or a model the plan cannot trace); printed once
    and recorded in run.json's ``placement``."""
    lz, hvp = config.lanczos, config.hvp
    vectors = plan.config.lanczos.vectors if plan is not None else lz.vectors.replace("auto", "device")
    restore = plan.config.hvp.restore if plan is not None else hvp.restore.replace("auto", "device")
    auto = [k for k, v in (("lanczos.vectors", lz.vectors), ("hvp.restore", hvp.restore)) if v == "auto"]
    recorder.set_placement(Placement(vectors=vectors, restore=restore), auto=auto,
                           planned=plan is not None)
    chosen = {"lanczos.vectors": vectors, "hvp.restore": restore}
    log("placement: " + ", ".join(f"{k}={v}" + (" (auto)" if k in auto else "") for k, v in chosen.items())
        + ("" if plan is not None or not auto else " (no plan: auto keeps them on the device)"))


def _use_calibration(calibration: Calibration, prepared: Prepared, recorder: Recorder, scheduler: Scheduler,
                     policy: ProbesPolicy | None = None) -> None:
    """Record the eps and queue every unfinished task at it (probe 0 first: its group holds its first HVP)."""
    recorder.set_calibration(calibration)
    log(calibration.message)
    if calibration.reliable is False:
        log("warning: the HVP at this eps is unreliable; results may be dominated by numerical noise")
    recorder.phase("probes")
    scheduler.submit(unfinished_tasks(prepared, recorder, eps=calibration.eps, policy=policy))


def _note_probe_decision(recorder: Recorder, policy: ProbesPolicy) -> None:
    """run.json's ``probes_auto`` once the policy has stopped adding probes (``lanczos.probes: auto``)."""
    if policy.auto and policy.decision is not None:
        recorder.info["probes_auto"] = policy.decision.as_record(probes=len(recorder.probes))


def probes_policy(prepared: Prepared, recorder: Recorder) -> ProbesPolicy:
    return ProbesPolicy(prepared.config, dimension=recorder.info["num_params"])


def unfinished_tasks(prepared: Prepared, recorder: Recorder, *, eps: float, policy: ProbesPolicy | None = None) -> list:
    """Every SLQ probe, block probe and (block, probe) spectrum, and the eigen task, that no invocation has
    finished yet, at ``eps``; the SLQ probes as many as ``policy`` (the run's; a new one by default) starts with.
    The eigen task comes first: it is the longest, and a group that takes it first leaves the probes to the
    others."""
    lz, blocks = prepared.config.lanczos, prepared.config.blocks
    eigen = prepared.config.eigen.k and not recorder.eigen_done
    tasks: list = [eigen_task(prepared, recorder, eps=eps)] if eigen else []
    if prepared.config.trace.estimator != "slq" and not recorder.trace_done:
        tasks.append(trace_task(prepared, eps=eps, placement=recorder.placement))
    policy = policy or probes_policy(prepared, recorder)
    started = set(recorder.folder.checkpoint_steps(pid for pid in range(lz.probe_budget) if pid not in recorder.probes))
    first = policy.begin({pid: recorder.tables.rule(pid) for pid in recorder.probes}, started=started)
    _note_probe_decision(recorder, policy)
    tasks += [probe_task(prepared, recorder, pid, eps=eps) for pid in first]
    if blocks.enabled:
        tasks += [BlockTask(probe_id=pid, seed=lz.seed + BLOCK_SEED_OFFSET, eps=eps, scheme=prepared.config.hvp.scheme,
                            placement=recorder.placement)
                  for pid in range(blocks.probes) if pid not in recorder.block_probes]
    if blocks.spectra:
        tasks += block_spectrum_tasks(prepared, recorder, eps=eps)
    if blocks.approximations:
        tasks += [approximation_task(prepared, pid, eps=eps, placement=recorder.placement)
                  for pid in range(blocks.probes) if pid not in recorder.approximation_probes]
    return tasks


def solver_dtype(config) -> str:
    """The vectors of the solver tasks (eigenpairs, low-rank pairs, trace): float64 for a float64 model, else
    float32 (a tolerance below bfloat16's resolution could never be met)."""
    return "float64" if config.model.dtype == "float64" else "float32"


def trace_task(prepared: Prepared, *, eps: float, placement) -> TraceTask:
    """The trace task at ``eps`` (trace.*: Hutch++ or deflated): float64 vectors for a float64 model, else
    float32."""
    config = prepared.config
    trace = config.trace
    return TraceTask(estimator=trace.estimator, eigen_tol=config.eigen.tol,
                     seed=config.lanczos.seed + TRACE_SEED_OFFSET, eps=eps, scheme=config.hvp.scheme,
                     sketch=trace.sketch, max_hvps=trace.max_hvps, rtol=trace.rtol,
                     vector_dtype=solver_dtype(config), placement=placement)


def approximation_task(prepared: Prepared, probe_id: int, *, eps: float, placement) -> ApproximationTask:
    """Probe ``probe_id`` of the approximation study; its low-rank eigenpairs to the eigen section's tolerance
    and HVP budget (per solve), in float64 for a float64 model, else float32."""
    config = prepared.config
    return ApproximationTask(probe_id=probe_id, seed=config.lanczos.seed + APPROXIMATION_SEED_OFFSET, eps=eps,
                             scheme=config.hvp.scheme, approximations=tuple(config.blocks.approximations),
                             eigen_tol=config.eigen.tol, eigen_max_hvps=config.eigen.max_hvps,
                             eigen_seed=config.lanczos.seed + APPROXIMATION_EIGEN_SEED_OFFSET,
                             vector_dtype=solver_dtype(config),
                             placement=placement)


def block_spectrum_tasks(prepared: Prepared, recorder: Recorder, *, eps: float) -> list[BlockSpectrumTask]:
    """One task per (block, probe) not finished yet, probe-major so that every block gets its first probe early."""
    from hessian_core.models import block_names

    config = prepared.config
    lz, blocks = config.lanczos, config.blocks
    names = block_names(model_spec(prepared))
    return [BlockSpectrumTask(block=name, probe_id=pid, seed=lz.seed + BLOCK_SPECTRA_SEED_OFFSET, eps=eps,
                              scheme=config.hvp.scheme, steps=blocks.spectra_steps or lz.steps, reorth=lz.reorth,
                              window=lz.window, vector_dtype=lz.vector_dtype, placement=recorder.placement)
            for pid in range(blocks.probes) for name in names if (name, pid) not in recorder.block_spectra]


def ray_scheduler(prepared: Prepared, recorder: Recorder, *, batches_ref, progress: Progress | None = None,
                  cancel: threading.Event | None = None, own_ray: bool = True,
                  pool: GroupPool | None = None, policy: ProbesPolicy | None = None) -> Scheduler:
    """The run's scheduler on Ray: its layout's groups, the recorder and the registered handlers listening."""
    config = prepared.config
    cluster = config.cluster
    settings = SchedulerSettings(num_groups=cluster.num_groups, min_groups=config.min_groups(),
                                 max_failures=cluster.max_failures,
                                 placement_timeout_seconds=cluster.placement_timeout_seconds)
    scheduler = Scheduler(settings=settings, backend=RayGroups(prepared, batches_ref=batches_ref, own_ray=own_ray, pool=pool),
                          listeners=[RecordingListener(recorder)], progress=progress,
                          checks=[lambda: ensure_held(recorder.out), lambda: _check_cancel(cancel)])
    scheduler.listeners.append(ResultHandling(RunContext(prepared=prepared, recorder=recorder, scheduler=scheduler,
                                                         probes=policy)))
    return scheduler


def _check_cancel(cancel: threading.Event | None) -> None:
    """Stop at a cancel (the sweep's) as an interruption that keeps the checkpoints."""
    if cancel is not None and cancel.is_set():
        reason = getattr(cancel, "reason", None)  # the sweep's own Interrupted, naming the signal
        stop = as_interrupted(reason if isinstance(reason, KeyboardInterrupt) else KeyboardInterrupt())
        raise Interrupted(stop.signum)  # a new one per point: the points' threads raise it at once


# -- the handlers of the package's tasks (pipeline.run.handlers) ------------------------------------------------
def _calibrated(run: RunContext, task: CalibrationTask, result: Calibration, group: int) -> None:
    _use_calibration(result, run.prepared, run.recorder, run.scheduler, run.probes)


def _probe_done(run: RunContext, task: ProbeTask, result: ProbeResult, group: int) -> None:
    run.recorder.add_probe(result, group=group)
    resumed = f", resumed at step {result.resumed_at_step}" if result.resumed_at_step else ""
    run.scheduler.progress.probe_finished(probe_id=result.probe_id, steps=len(result.alphas),
                                          budget=task.steps)
    log(f"probe {result.probe_id} done on group {group}: {len(result.alphas)} steps ({result.stopped}{resumed})")
    policy = run.probes
    if policy is not None and policy.auto:
        more = policy.finished({pid: run.recorder.tables.rule(pid) for pid in run.recorder.probes})
        _note_probe_decision(run.recorder, policy)
        if more:
            run.scheduler.progress.grow(len(more) * task.steps)
            log(f"probes: {len(run.recorder.probes)} finished, not converged yet: queueing probe(s) "
                f"{', '.join(map(str, more))}")
            run.scheduler.submit([probe_task(run.prepared, run.recorder, pid, eps=task.eps) for pid in more])
        elif policy.decision is not None and len(run.recorder.probes) == policy.queued:
            d = policy.decision
            log(f"probes: {len(run.recorder.probes)} finished; {d.stopped}"
                + (f" (trace stderr {d.figures.trace_rel_stderr:.3g} x |trace|, halves' W1 {d.figures.halves_w1:.3g} x "
                   f"width)" if d.figures is not None else ""))


def _block_spectrum_done(run: RunContext, task: BlockSpectrumTask, result: BlockSpectrumResult, group: int) -> None:
    run.recorder.add_block_spectrum(result)
    run.scheduler.progress.task_done(f"block {result.block} probe {result.probe_id}")
    log(f"block {result.block} probe {result.probe_id} done: {len(result.alphas)} steps ({result.stopped})")


def _block_probe_done(run: RunContext, task: BlockTask, result: BlockResult, group: int) -> None:
    run.recorder.add_block_probe(result)
    run.scheduler.progress.task_done(f"block probe {result.probe_id}")
    log(f"block probe {result.probe_id} done: whole block-diagonal error {result.whole_rel_error:.3f}")


def _approximation_probe_done(run: RunContext, task: ApproximationTask, result: ApproximationResult,
                              group: int) -> None:
    run.recorder.add_approximation_probe(result)
    run.scheduler.progress.task_done(f"approximation probe {result.probe_id}")
    whole = dict(zip(result.approximations, result.whole_rel_error))
    solved = f" (low-rank eigenpairs: {result.lowrank_hvps} HVPs)" if result.lowrank_hvps else ""
    log(f"approximation probe {result.probe_id} done on group {group}{solved}: relative error of A v "
        + ", ".join(f"{name} {err:.3f}" for name, err in whole.items()))


def _trace_done(run: RunContext, task: TraceTask, result: TraceResult, group: int) -> None:
    run.recorder.add_trace(result)
    run.scheduler.progress.task_done(task.label)
    log(f"{task.label} done on group {group}: {result.trace:.6g} +- {result.stderr:.3g} "
        f"({result.stderr / abs(result.trace) if result.trace else float('nan'):.2%}) in {result.hvps} HVPs "
        f"({result.sketch} {'sketch vectors' if task.estimator == 'hutchpp' else 'eigenpairs'}, "
        f"{len(result.samples)} samples; {result.stopped})")


def _eigen_done(run: RunContext, task: EigenTask, result: EigenpairsResult, group: int) -> None:
    run.recorder.add_eigen(result)
    run.scheduler.progress.task_done("eigenpairs")
    resumed = f", resumed at restart {result.resumed_at_restart}" if result.resumed_at_restart else ""
    log(f"eigenpairs done on group {group}: {sum(result.converged)}/{result.k} converged ({result.stopped}) in "
        f"{result.hvps} HVPs, {result.restarts} restarts{resumed}; lambda_1 = {result.eigenvalues[0]:.6g} "
        f"+- {result.errors[0]:.2g}; gradient fraction in the top {result.k}: {result.gradient_fraction:.3g}")
    wide = wide_bars(result.eigenvalues, result.errors)
    if wide:
        log(f"warning: eigenvalue(s) {', '.join(str(i + 1) for i in wide)} have FD bars over "
            f"{WIDE_BAR_FRACTION:.0%} of their value at eps={result.eps:.3g}: the eps is too large along those "
            f"eigenvectors and the bars may not cover the error; rerun with a smaller hvp.eps (e.g. "
            f"--set hvp.eps={result.eps / 10:.2g})")


handlers.register(CalibrationTask, finished=_calibrated, started=lambda run, task: run.recorder.phase("calibration"))
handlers.register(ProbeTask, finished=_probe_done,
                  started=lambda run, task: run.recorder.clear_unfinished_checkpoint(task.probe_id))
handlers.register(BlockTask, finished=_block_probe_done)
handlers.register(BlockSpectrumTask, finished=_block_spectrum_done)
handlers.register(ApproximationTask, finished=_approximation_probe_done)
handlers.register(TraceTask, finished=_trace_done)
handlers.register(EigenTask, finished=_eigen_done,
                  started=lambda run, task: run.recorder.clear_unfinished_eigen_checkpoint())


def probe_task(prepared: Prepared, recorder: Recorder, probe_id: int, *, eps: float) -> ProbeTask:
    config = prepared.config
    lz = config.lanczos
    return ProbeTask(probe_id=probe_id, seed=lz.seed, eps=eps, scheme=config.hvp.scheme, steps=lz.step_budget,
                     reorth=lz.reorth, window=lz.window, vector_dtype=lz.vector_dtype,
                     checkpoint_dir=recorder.checkpoint_dir(probe_id), checkpoint_every=config.checkpoint.every,
                     checkpoint_meta={"config": config.digest()}, placement=recorder.placement,
                     operator=lz.operator, stop_tol=lz.tol if lz.steps == "auto" else None)


def eigen_task(prepared: Prepared, recorder: Recorder, *, eps: float) -> EigenTask:
    """The run's eigen task at ``eps``: its vectors in float64 for a float64 model, else float32 (a tolerance
    below bfloat16's resolution could never be met); its checkpoints and eigenvectors where the run folder
    keeps them; the round-off coefficient from the eps calibration (None where it assessed nothing)."""
    config = prepared.config
    eigen = config.eigen
    roundoff = (recorder.info.get("eps_calibration") or {}).get("roundoff")
    return EigenTask(k=eigen.k, which=eigen.which, tol=eigen.tol, max_hvps=eigen.max_hvps, basis=eigen.basis,
                     seed=config.lanczos.seed + EIGEN_SEED_OFFSET, eps=eps, scheme=config.hvp.scheme,
                     vector_dtype=solver_dtype(config), roundoff=roundoff,
                     checkpoint_dir=recorder.folder.eigen_checkpoint_dir if config.checkpoint.every != 0 else None,
                     checkpoint_meta={"config": config.digest()},
                     vectors_dir=recorder.folder.eigenvectors_dir if eigen.save_vectors else None,
                     landscape_points_1d=eigen.landscape.points_1d, landscape_points_2d=eigen.landscape.points_2d,
                     landscape_range=None if eigen.landscape.range == "auto" else float(eigen.landscape.range),
                     placement=recorder.placement)


def _remaining_steps(prepared: Prepared, recorder: Recorder) -> int:
    config = prepared.config
    done = recorder.info.get("resumed_from", {}).get("checkpoint_steps", {})
    lz = config.lanczos
    # the probes the run begins with (auto: its first wave and what it resumes; later waves grow the total)
    count = ProbesPolicy(config, dimension=1).first_count(set(recorder.probes), {int(pid) for pid in done})
    slq = sum(lz.step_budget - done.get(str(pid), 0) for pid in range(count) if pid not in recorder.probes)
    blocks = config.blocks.probes - len(recorder.block_probes) if config.blocks.enabled else 0
    spectra = 0
    if config.blocks.spectra:  # one progress step per (block, probe) task; the block count needs the model
        from hessian_core.models import block_names

        spectra = len(block_names(model_spec(prepared))) * config.blocks.probes - len(recorder.block_spectra)
    eigen = int(bool(config.eigen.k) and not recorder.eigen_done)  # one progress step for the whole eigen task
    approximations = (config.blocks.probes - len(recorder.approximation_probes)
                      if config.blocks.approximations else 0)
    trace = int(config.trace.estimator != "slq" and not recorder.trace_done)
    return slq + blocks + spectra + eigen + approximations + trace


__all__ = ["preflight", "run", "draw_plots", "block_summary", "Prepared", "log", "probe_task"]
