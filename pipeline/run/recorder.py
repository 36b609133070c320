"""The run's record on disk, through its ``RunFolder``: each finished task's rows (``TableWriter``), run.json
(status, eps, groups timeline, timing by phase), the checkpoints' bookkeeping, and the summary, density and
plots at the end.

What an earlier invocation on the same output_dir finished is read back at construction, so a resumed run
only adds to it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from actors.records import (ApproximationResult, as_dict, BlockResult, BlockSpectrumResult, Calibration,
                            EigenpairsResult, GroupInfo, Placement, ProbeResult, TraceResult)
from hessian_core import SpectralMeasure, latest_complete_step, ritz_rule, smoothed_density
from hessian_core.checkpoint import discard_after
from hessian_core.error_bars import summary_error_fields
from hessian_core.quadrature import SIGMA_FRACTION, summarize
from hessian_core.statistics import bulk_interval

from .output_lock import ensure_held
from .preflight import Prepared
from .ray_connection import versions
from .run_folder import (APPROXIMATIONS_PNG, BLOCKS_PNG, BlockSpectrum, DENSITY_PNG, EIGEN_MASS_PNG, EIGENVECTORS,
                         LANDSCAPE_PNG, REWRITE_FACTOR, RunFolder, RunInfo, sigma_of, TableWriter)

OPERATOR_TITLES = {"hessian": "Hessian", "gauss_newton": "Gauss-Newton", "residual": "Residual H - G"}
PHASES = ("startup", "load", "calibration", "probes", "finish")
CHEAP_SAVE_SECONDS = 0.05  # a run.json written faster than this is written after every event
# run.json's keys about how an invocation ended, which the next invocation does not inherit
ENDED_KEYS = ("status", "error", "signal", "interrupted_at", "finished_at")


class Recorder:
    """One invocation's results and bookkeeping; a crash loses nothing that was finished."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.config = prepared.config
        self.out = self.config.output_dir
        self.folder = RunFolder(self.out)
        self.started = time.time()
        self.info: dict[str, Any] = {"status": "running", "config": self.config.to_dict(), "resumed": False,
                                     "versions": versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "groups": [], "probes_moved": 0, "probe_groups": {}, "running": {}}
        self.hvp_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.checkpoint_seconds = 0.0
        self.hvp_count = 0
        self.grad_seconds: float | None = None
        self.phase_started = {"startup": self.started}
        self.phase_seconds: dict[str, float] = {}
        self._last_save = float("-inf")
        self._save_seconds = 0.0
        # what an earlier invocation on this output_dir (same config, checked in preflight) finished
        self.placement = Placement()  # the driver sets the run's (pipeline.run.driver._choose_placement)
        self.previous: RunInfo = self.folder.read_info() or RunInfo()
        self.grad_seconds = self.previous.grad_seconds
        self.tables = TableWriter(self.folder, config_json=self.config.to_json())
        self.eigen_done = self.folder.has_eigen()  # an earlier invocation finished the eigen task
        self.trace_done = self.folder.has_trace()
        self._note_resumed()
        self._keep_previous()

    @property
    def probes(self) -> dict[int, dict]:
        """probe id -> {"alphas": [...], "betas": [...]} of the finished SLQ probes."""
        return self.tables.probes

    @property
    def block_probes(self) -> dict[int, dict]:
        return self.tables.block_probes

    @property
    def block_spectra(self) -> dict[tuple[str, int], BlockSpectrum]:
        return self.tables.block_spectra

    @property
    def approximation_probes(self) -> dict[int, list[dict]]:
        """probe id -> its rows of the approximation study, every finished study probe."""
        return self.tables.approximation_probes

    def _anything_finished(self) -> bool:
        return bool(self.probes or self.block_probes or self.block_spectra or self.approximation_probes
                    or self.eigen_done or self.trace_done)

    def checkpoint_dir(self, probe_id: int) -> str:
        return self.folder.checkpoint_dir(probe_id)

    def _note_resumed(self) -> None:
        checkpoints = self.folder.checkpoint_steps(pid for pid in range(self.config.lanczos.probe_budget)
                                                   if pid not in self.probes)
        eigen = _eigen_progress(self.folder) if self.config.eigen.k else None
        if self._anything_finished() or checkpoints or eigen:
            self.info["resumed"] = True
            self.info["resumed_from"] = {"finished_probes": sorted(self.probes),
                                         "finished_block_probes": sorted(self.block_probes),
                                         "finished_approximation_probes": sorted(self.approximation_probes),
                                         "finished_block_spectra": len(self.block_spectra),
                                         "checkpoint_steps": {str(k): v for k, v in checkpoints.items()}}
            if eigen:
                self.info["resumed_from"]["eigen"] = eigen

    def _keep_previous(self) -> None:
        """An earlier invocation's record stays (num_params, eps, its calibration, a summary until the finish
        rewrites it): a resume never writes less than it read. Only how that invocation ended is dropped; its
        groups timeline (times from its own start) moves to ``earlier_groups``, and the probes' groups and
        moves add up."""
        previous = self.previous.to_dict()
        for name, value in previous.items():
            if name not in ENDED_KEYS and name not in self.info:
                self.info[name] = value
        if previous.get("groups"):
            self.info["earlier_groups"] = [*previous.get("earlier_groups", []),
                                           {"started_at": previous.get("started_at"), "groups": previous["groups"]}]
        self.info["probe_groups"] = dict(self.previous.probe_groups or {})
        self.info["probes_moved"] = int(self.previous.probes_moved or 0)

    def set_placement(self, placement: Placement, *, auto: list[str], planned: bool) -> None:
        """run.json's ``placement``: where this invocation keeps the Lanczos vectors and the restore copy, and
        which of the two ``auto`` chose (from the plan, or ``device`` where there was none)."""
        self.placement = placement
        self.info["placement"] = {"lanczos.vectors": placement.vectors, "hvp.restore": placement.restore,
                                  "auto": auto, "planned": planned}
        self.save_info()

    def set_num_params(self, num_params: int) -> None:
        self.info["num_params"] = num_params
        self.save_info()

    # -- phases and events --------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Start phase ``name`` (one of PHASES); the previous one ends now."""
        now = time.time()
        for previous, started in self.phase_started.items():
            if previous not in self.phase_seconds:
                self.phase_seconds[previous] = now - started
        self.phase_started[name] = now

    def group_event(self, index: int, event: str, *, cause: str | None = None, info: GroupInfo | None = None) -> None:
        """The groups timeline in run.json: formed / lost / requested, with the node(s) and the cause."""
        row = {"group": index, "event": event, "at_seconds": round(time.time() - self.started, 3)}
        if cause:
            row["cause"] = cause
        if info is not None:
            row.update(nodes=info.nodes, pids=info.pids, load_seconds=info.load_seconds,
                       peak_rss_mib_per_rank=info.peak_rss_mib_per_rank, loading_per_rank=info.loading_per_rank,
                       load_memory_per_rank=info.load_memory_per_rank)
        self.info["groups"].append(row)
        self._save_soon()

    def clear_unfinished_checkpoint(self, probe_id: int) -> None:
        """Before a probe (re)starts: drop steps and vectors newer than its latest complete checkpoint, which a
        writer killed mid-save (maybe of another group size) left behind."""
        ensure_held(self.out)  # deletes: not in a folder another run took over
        folder = self.checkpoint_dir(probe_id)
        found = latest_complete_step(folder)
        discard_after(folder, found[0] if found else 0)

    def running(self, group: int, task: str | None) -> None:
        """run.json's ``running``: what each busy group is doing now."""
        busy = self.info.setdefault("running", {})
        if task is None:
            busy.pop(str(group), None)
        else:
            busy[str(group)] = task
        self._save_soon()

    def probe_moved(self) -> None:
        self.info["probes_moved"] += 1

    def set_calibration(self, calibration: Calibration) -> None:
        self.info["eps"] = calibration.eps
        self.info["eps_calibration"] = as_dict(calibration)
        self.hvp_count += calibration.hvp_count
        if calibration.grad_seconds is not None and np.isfinite(calibration.grad_seconds):
            self.grad_seconds = calibration.grad_seconds
        self.save_info()

    def save_info(self) -> None:
        """run.json now."""
        started = time.monotonic()
        timing = {
            "grad_seconds": self.grad_seconds,
            "hvp_seconds": statistics.median(self.hvp_seconds) if self.hvp_seconds else None,
            "lanczos_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else None,
            "checkpoint_seconds": self.checkpoint_seconds,
            "hvp_count": self.hvp_count,
            "total_seconds": time.time() - self.started,
        }
        timing.update({f"{name}_seconds": self.phase_seconds.get(name) for name in PHASES})
        self.info["timing"] = timing
        self.folder.write_info(self.info)
        self._last_save = time.monotonic()
        self._save_seconds = self._last_save - started

    def _save_soon(self) -> None:
        """run.json after an event: now, unless writing it has grown costly (a long groups timeline, many
        probes) and was done lately; then the next event or the finish writes it. Its writes take at most
        1/REWRITE_FACTOR of the time, whatever the task count."""
        costly = max(0.0, self._save_seconds - CHEAP_SAVE_SECONDS)
        if time.monotonic() - self._last_save >= REWRITE_FACTOR * costly:
            self.save_info()

    # -- results --------------------------------------------------------------------------------------------
    def add_probe(self, result: ProbeResult, *, group: int) -> None:
        self.info["probe_groups"][str(result.probe_id)] = group
        self.hvp_seconds += result.hvp_seconds
        self.step_seconds += result.step_seconds
        self.checkpoint_seconds += sum(result.checkpoint_seconds)
        # the calibration counted the HVP that this probe reused as its first step
        steps = len(result.hvp_seconds) - int(result.reused_first_matvec)
        operator = self.config.lanczos.operator  # a step is an HVP, a G v (gauss_newton) or one of each (residual)
        if operator != "gauss_newton":
            self.hvp_count += steps
        if operator != "hessian":
            self.info["gauss_newton_products"] = self.info.get("gauss_newton_products", 0) + steps
        self.tables.add_probe(result.probe_id, result.alphas, result.betas)
        # the probe is now final rows on disk: its checkpoint is no longer needed
        self.folder.remove_checkpoint(result.probe_id)
        self._save_soon()

    def add_block_probe(self, result: BlockResult) -> None:
        self.hvp_count += result.hvp_count
        self.tables.add_block_probe(as_dict(result))
        self._save_soon()

    def add_approximation_probe(self, result: ApproximationResult) -> None:
        self.hvp_count += result.hvp_count
        self.info["gauss_newton_products"] = self.info.get("gauss_newton_products", 0) + result.gauss_newton_products
        rows = [{"probe_id": result.probe_id, "approximation": name, "block": block, "rel_error": rel,
                 "cosine": cos, "whole_rel_error": whole_rel, "whole_cosine": whole_cos}
                for name, block, rel, cos, whole_rel, whole_cos in zip(
                    result.approximations, result.blocks, result.rel_error, result.cosine, result.whole_rel_error,
                    result.whole_cosine)]
        self.tables.add_approximation_probe(result.probe_id, rows)
        if result.lowrank_solves:  # the group's own solve (every group that took a study probe makes the same one)
            self.info.setdefault("approximation_eigen", {}).update(result.lowrank_solves)
        self._save_soon()

    def add_trace(self, result: TraceResult) -> None:
        """The trace task's estimate: run.json's ``trace`` (saved first), then trace.parquet, which marks it
        finished."""
        self.hvp_count += result.hvps
        self.info["trace"] = {"estimator": self.config.trace.estimator, "trace": result.trace, "stderr": result.stderr,
                              "rel_stderr": result.stderr / abs(result.trace) if result.trace else None,
                              "sketch": result.sketch, "sketch_trace": result.sketch_trace,
                              "samples": len(result.samples), "hvps": result.hvps, "stopped": result.stopped,
                              "seconds": result.seconds}
        self.save_info()
        self.tables.write_trace(span=result.sketch_trace, samples=result.samples)
        self.trace_done = True

    def add_block_spectrum(self, result: BlockSpectrumResult) -> None:
        rule = ritz_rule(result.alphas, result.betas)
        self.hvp_count += result.hvp_count
        self.tables.add_block_spectrum(result.block, result.probe_id, BlockSpectrum(
            values=rule.values.tolist(), weights=rule.weights.tolist(), block_size=result.block_size))
        self._save_soon()

    def add_eigen(self, result: EigenpairsResult) -> None:
        """The eigen task's tables (eigenpairs.parquet last: the task counts as finished once it is written), its
        summary in run.json's ``eigen``; its solver states are no longer needed."""
        self.hvp_count += result.hvp_count
        self.tables.write_eigen(**eigen_columns(result))
        self.info["eigen"] = eigen_summary(result, compute_dtype=self.config.model.compute_dtype
                                           or self.config.model.dtype)
        self.eigen_done = True
        self.folder.remove_eigen_checkpoint()
        self.save_info()

    def clear_unfinished_eigen_checkpoint(self) -> None:
        """Before the eigen task (re)starts: drop the solver states a group killed mid-save left incomplete (maybe
        of another group size), which a save of the same name would otherwise find."""
        from hessian_core.eigen_checkpoint import discard_incomplete

        ensure_held(self.out)
        discard_incomplete(self.folder.eigen_checkpoint_dir)

    def complete(self, *, failures_recovered: int) -> None:
        self.info["worker_failures_recovered"] = failures_recovered
        ensure_held(self.out)  # deletes, then writes: not in a folder another run took over
        self.folder.remove_checkpoints()
        self.phase("finish")
        self.finish()
        self.phase("done")
        self.info["status"] = "complete"
        self.info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save_info()
        if self.config.log_to:
            log_figures(self.config.log_to, [(0, self.info)])

    def failed(self, err: BaseException) -> None:
        self.info["status"] = "failed"
        text = str(err).strip()
        self.info["error"] = f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"
        try:
            self.tables.compact()  # the folder as the finish leaves it: whole tables, no parts
            if self._anything_finished():
                self.finish()
        finally:
            self.save_info()

    def interrupted(self, signal_name: str) -> None:
        """Stopped by a signal: what finished is kept, checkpoints too, and the same command resumes."""
        self.info["status"] = "interrupted"
        self.info["signal"] = signal_name
        self.info.pop("error", None)
        self.info["interrupted_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            self.tables.compact()
            if self._anything_finished():
                self.finish()
        finally:
            self.save_info()

    def finish(self) -> None:
        """The tables whole, then the summary, density table and plots from what the tasks produced."""
        self.tables.compact()
        if self.probes:
            rules = self.tables.rules()
            self.info["summary"] = summarize(rules, dimension=self.info["num_params"]).as_record()
            # error bars: Ritz residual + the FD HVP's Weyl bound (hessian_core.error_bars)
            relative = (self.info.get("eps_calibration") or {}).get("relative_error")
            self.info["summary"].update(summary_error_fields(self.info["summary"], hvp_relative_error=relative))
            if self.config.density.enabled:
                dens = smoothed_density(SpectralMeasure.from_rules(rules), grid_size=self.config.density.grid_size)
                self.info["density"] = {"sigma": dens.sigma, "sigma_rule": f"{SIGMA_FRACTION} * (max - min Ritz value)"}
                self.tables.write_density(dens.grid, dens.density)
        if self.block_probes:
            self.info["blocks"] = block_summary(self.folder.blocks_frame())
        if self.block_spectra:
            self.info["block_spectra"] = block_spectra_summary(self.folder.block_ritz_frame())
        if self.approximation_probes:
            from .approximations import approximation_summary

            self.info["approximations"] = approximation_summary(self.folder.approximations_frame())
        draw_plots(self.out)


def key_figures(info: dict) -> dict[str, float]:
    """A finished run's key figures as ``hessian/*`` scalars (what ``log_to`` sinks receive): the spectrum's
    summary, the eps, HVPs and seconds, the block-diagonal error and the top eigenvalue where they were measured."""
    summary = info.get("summary") or {}
    timing = info.get("timing") or {}
    figures = {k: summary.get(k) for k in ("lambda_max", "lambda_min", "trace", "trace_stderr")}
    figures.update(eps=info.get("eps"), hvp_count=timing.get("hvp_count"), seconds=timing.get("total_seconds"),
                   block_diagonal_error=((info.get("blocks") or {}).get("overall") or {}).get("whole_rel_error_mean"),
                   eigen_top=((info.get("eigen") or {}).get("eigenvalues") or [None])[0])
    return {f"hessian/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float)) and v == v}


def log_figures(log_to: list[str], runs: list[tuple[int, dict]]) -> None:
    """Each (step, run.json dict)'s key figures to the ``log_to`` sinks at that step."""
    from hessian_core.integrations.sinks import open_sinks

    sinks = open_sinks(log_to)
    try:
        for step, info in runs:
            sinks.log(key_figures(info), step)
    finally:
        sinks.close()


def block_summary(df) -> dict:
    """Per-block and overall mean +- std of the block-diagonal errors over the probes."""
    per_block = df.groupby("block", sort=False).agg(rel_error_mean=("rel_error", "mean"),
                                                    rel_error_std=("rel_error", "std"),
                                                    cosine_mean=("cosine", "mean"), cosine_std=("cosine", "std"))
    whole = df.groupby("probe_id")["whole_rel_error"].first()
    return {"overall": {"rel_error_mean": float(df.rel_error.mean()), "rel_error_std": float(df.rel_error.std()),
                        "cosine_mean": float(df.cosine.mean()), "cosine_std": float(df.cosine.std()),
                        "whole_rel_error_mean": float(whole.mean())},
            "per_block": {b: {k: float(v) for k, v in row.items()} for b, row in per_block.iterrows()},
            "order": [str(b) for b in per_block.index]}  # model order (run.json's keys are written sorted)


def block_spectra_summary(df) -> dict:
    """Per block: its size, probes, and the extreme Ritz values of H_bb over its probes."""
    return {block: {"block_size": int(rows.block_size.iloc[0]), "probes": int(rows.probe_id.nunique()),
                    "lambda_max": float(rows.value.max()), "lambda_min": float(rows.value.min())}
            for block, rows in df.groupby("block", sort=False)}


def _eigen_progress(folder: RunFolder) -> str | dict | None:
    """What an earlier invocation left of the eigen task: ``"finished"``, or the restarts and HVPs of its newest
    complete solver state, or None."""
    from hessian_core.eigen_checkpoint import latest_eigen_state

    if folder.has_eigen():
        return "finished"
    found = latest_eigen_state(folder.eigen_checkpoint_dir)
    return None if found is None else {"restarts": found[1]["restarts"], "hvps": found[1]["hvps"]}


def eigen_columns(result: EigenpairsResult) -> dict[str, dict]:
    """The eigen task's tables as columns (``TableWriter.write_eigen``): one row per pair; one per eigenvector
    and parameter tensor; one per landscape point (slice ``1d``: t1 along u_1, t2 = 0; ``2d``: t1 along u_1,
    t2 along u_2)."""
    n, p = len(result.eigenvalues), len(result.mass_tensors)
    pairs = {"index": list(range(n)), "eigenvalue": result.eigenvalues, "residual": result.residuals,
             "fd_bound": result.fd_bounds, "error": result.errors, "converged": result.converged,
             "rayleigh_eps": result.rayleigh_eps, "rayleigh_2eps": result.rayleigh_2eps}
    mass = {"eigenvector": [i for i in range(n) for _ in range(p)], "block": result.mass_block_of * n,
            "tensor": result.mass_tensors * n, "mass": [m for row in result.mass_per_tensor for m in row]}
    grid = [(s, t, loss) for s, row in zip(result.landscape_2d_s, result.landscape_2d_loss)
            for t, loss in zip(result.landscape_2d_t, row)]
    landscape = {"slice": ["1d"] * len(result.landscape_t) + ["2d"] * len(grid),
                 "t1": result.landscape_t + [g[0] for g in grid],
                 "t2": [0.0] * len(result.landscape_t) + [g[1] for g in grid],
                 "loss": result.landscape_loss + [g[2] for g in grid]}
    return {"pairs": pairs, "mass": mass, "landscape": landscape}


def eigen_summary(result: EigenpairsResult, *, compute_dtype: str) -> dict:
    """run.json's ``eigen``: the solver's run (k, which, tol, hvps, restarts, why it stopped, how many pairs
    converged), the eigenvalues with their bars, the gradient fraction, and the landscape's curvature check
    (the second difference at t = 0 along u_1, which equals lambda_1 within ``landscape_curvature_bound``)."""
    import torch

    from hessian_core.eigen_measures import curvature_at_0

    out = {"k": result.k, "which": result.which, "tol": result.tol, "eps": result.eps, "hvps": result.hvps,
           "restarts": result.restarts, "stopped": result.stopped, "converged": int(sum(result.converged)),
           "all_converged": all(result.converged), "eigenvalues": result.eigenvalues, "errors": result.errors,
           "norm_estimate": result.norm_estimate, "gradient_fraction": result.gradient_fraction,
           "grad_norm": result.grad_norm, "loss": result.loss,
           "vectors": EIGENVECTORS if result.vectors_saved else None,
           "resumed_at_restart": result.resumed_at_restart, "resumed_at_hvps": result.resumed_at_hvps,
           "seconds": result.seconds, "solver_seconds": result.solver_seconds}
    if len(result.landscape_t) >= 3:
        eps_mach = float(torch.finfo(getattr(torch, compute_dtype)).eps)
        second, bound = curvature_at_0(result.landscape_t, result.landscape_loss, eps_mach=eps_mach)
        out.update(landscape_range=max(result.landscape_t), landscape_curvature=second,
                   landscape_curvature_bound=bound)
    return out


def draw_plots(run_dir: str) -> list[str]:
    """(Re)draw every plot whose table exists; returns the files written."""
    from .plots import plot_blocks, plot_density

    folder = RunFolder(run_dir)
    written = []
    wanted = (folder.read_info() or RunInfo()).density_wanted
    table = folder.density_table()
    if folder.has_spectrum() and (wanted or table is not None):
        rules = folder.ritz_rules()
        measure = SpectralMeasure.from_rules(rules)
        matrix = OPERATOR_TITLES.get(((folder.read_info() or RunInfo()).config.get("lanczos") or {}).get("operator"),
                                     "Hessian")
        title = f"{matrix} spectral density ({len(rules)} probe{'s' if len(rules) != 1 else ''})"
        if table is not None:
            grid, density = table
        else:  # a run stopped before its end: the density of the probes it finished, not written as a table
            dens = smoothed_density(measure, grid_size=1000)
            grid, density = dens.grid, dens.density
            title += ", partial run"
        overlay = folder.block_densities(grid=grid, sigma=sigma_of(rules)) or None
        plot_density(folder.plot_path(DENSITY_PNG), grid=grid, density=density,
                     ritz_values=np.concatenate([r.values for r in rules]), title=title,
                     atoms=(measure.values, measure.weights), bulk=bulk_interval(measure), blocks=overlay)
        written.append(DENSITY_PNG)
    df = folder.blocks_frame()
    if df is not None:
        names = list(dict.fromkeys(df.block))
        rel = df.pivot(index="probe_id", columns="block", values="rel_error")[names].to_numpy()
        cos = df.pivot(index="probe_id", columns="block", values="cosine")[names].to_numpy()
        plot_blocks(folder.plot_path(BLOCKS_PNG), blocks=names, rel_error=rel, cosine=cos,
                    title="Block-diagonal approximation: per-block error of H v")
        written.append(BLOCKS_PNG)
    approximations = folder.approximations_frame()
    if approximations is not None:
        from .plots import plot_approximations

        plot_approximations(folder.plot_path(APPROXIMATIONS_PNG), approximations)
        written.append(APPROXIMATIONS_PNG)
    written += _draw_eigen_plots(folder)
    return written


def _draw_eigen_plots(folder: RunFolder) -> list[str]:
    """eigen_mass.png (eigenvector x block heatmap) and landscape.png (the 1-D curve and the 2-D contour) from
    the eigen task's tables, where they exist."""
    from .plots import plot_eigen_mass, plot_landscape

    written = []
    pairs, mass = folder.eigenpairs_frame(), folder.eigen_mass_frame()
    if pairs is not None and mass is not None and len(mass):
        blocks = list(dict.fromkeys(mass.block))  # model order
        per_block = mass.groupby(["eigenvector", "block"], sort=False).mass.sum().unstack("block")[blocks]
        plot_eigen_mass(folder.plot_path(EIGEN_MASS_PNG), blocks=blocks, mass=per_block.sort_index().to_numpy(),
                        eigenvalues=pairs.sort_values("index").eigenvalue.to_numpy())
        written.append(EIGEN_MASS_PNG)
    landscape = folder.landscape_frame()
    if pairs is not None and landscape is not None and len(landscape):
        one = landscape[landscape["slice"] == "1d"]
        two = landscape[landscape["slice"] == "2d"]
        grid = None
        if len(two):
            table = two.pivot(index="t1", columns="t2", values="loss").sort_index().sort_index(axis=1)
            grid = (table.index.to_numpy(), table.columns.to_numpy(), table.to_numpy())
        values = pairs.sort_values("index").eigenvalue.to_numpy()
        plot_landscape(folder.plot_path(LANDSCAPE_PNG), t=one.t1.to_numpy(), loss=one.loss.to_numpy(), grid=grid,
                       eigenvalues=values[:2])
        written.append(LANDSCAPE_PNG)
    return written
