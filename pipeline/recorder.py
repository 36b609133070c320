"""The run's record on disk: result tables rewritten after every finished probe, run.json (status, eps, groups
timeline, timing by phase), the checkpoints' bookkeeping, and the summary, density and plots at the end.

What an earlier invocation on the same output_dir finished is read back at construction, so a resumed run
only adds to it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from typing import Any

import numpy as np

from actors.records import BlockResult, BlockSpectrumResult, Calibration, GroupInfo, Placement, ProbeResult, as_dict
from hessian_core import (SpectralMeasure, extreme_eigenvalues, latest_complete_step, ritz_rule, smoothed_density,
                          trace_estimate)
from hessian_core.checkpoint import discard_after
from hessian_core.quadrature import SIGMA_FRACTION
from hessian_core.error_bars import summary_error_fields
from hessian_core.statistics import bulk_interval

from .output_lock import ensure_held
from .preflight import CHECKPOINTS, Prepared
from .ray_connection import versions
from .tables import (BLOCK_RITZ_SCHEMA, BLOCKS_SCHEMA, DENSITY_SCHEMA, LANCZOS_SCHEMA, RITZ_SCHEMA, read_json,
                     read_table, write_json, write_table)

PHASES = ("startup", "load", "calibration", "probes", "finish")
# run.json's keys about how an invocation ended, which the next invocation does not inherit
ENDED_KEYS = ("status", "error", "signal", "interrupted_at", "finished_at")


class Recorder:
    """One invocation's results and bookkeeping; a crash loses nothing that was finished."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.config = prepared.config
        self.out = self.config.output_dir
        self.config_json = self.config.to_json()
        self.started = time.time()
        self.info: dict[str, Any] = {"status": "running", "config": self.config.to_dict(), "resumed": False,
                                     "versions": versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "groups": [], "probes_moved": 0, "probe_groups": {}, "running": {}}
        self.probes: dict[int, dict] = {}  # probe id -> {"alphas": [...], "betas": [...]}
        self.block_probes: dict[int, dict] = {}
        self.block_spectra: dict[tuple[str, int], dict] = {}  # (block, probe) -> Ritz values, weights, block size
        self.hvp_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.checkpoint_seconds = 0.0
        self.hvp_count = 0
        self.grad_seconds: float | None = None
        self.phase_started = {"startup": self.started}
        self.phase_seconds: dict[str, float] = {}
        self.previous: dict = {}
        self.placement = Placement()  # the driver sets the run's (pipeline.driver._choose_placement)
        self._load_previous()
        self._keep_previous()

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def checkpoint_dir(self, probe_id: int) -> str:
        return os.path.abspath(self.path(os.path.join(CHECKPOINTS, f"probe-{probe_id:05d}")))

    def _load_previous(self) -> None:
        """What an earlier invocation on this output_dir (same config, checked in preflight) finished."""
        if os.path.exists(self.path("run.json")):
            with open(self.path("run.json")) as f:
                self.previous = json.load(f)
            self.grad_seconds = (self.previous.get("timing") or {}).get("grad_seconds")
        if os.path.exists(self.path("lanczos.parquet")):
            df = read_table(self.path("lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])
            for pid, rows in df.groupby("probe_id"):
                self.probes[int(pid)] = {"alphas": rows.alpha.tolist(), "betas": rows.beta.tolist()}
        if os.path.exists(self.path("blocks.parquet")):
            df = read_table(self.path("blocks.parquet")).to_pandas()
            for pid, rows in df.groupby("probe_id", sort=True):
                self.block_probes[int(pid)] = {"probe_id": int(pid), "blocks": rows.block.tolist(),
                                               "rel_error": rows.rel_error.tolist(), "cosine": rows.cosine.tolist(),
                                               "whole_rel_error": float(rows.whole_rel_error.iloc[0])}
        if os.path.exists(self.path("block_ritz.parquet")):
            df = read_table(self.path("block_ritz.parquet")).to_pandas()
            for (block, pid), rows in df.groupby(["block", "probe_id"], sort=False):
                self.block_spectra[(block, int(pid))] = {"values": rows.value.tolist(), "weights": rows.weight.tolist(),
                                                         "block_size": int(rows.block_size.iloc[0])}
        checkpoints = {}
        for pid in range(self.config.lanczos.probes):
            found = latest_complete_step(self.checkpoint_dir(pid))
            if found is not None and pid not in self.probes:
                checkpoints[pid] = found[0]
        if self.probes or self.block_probes or self.block_spectra or checkpoints:
            self.info["resumed"] = True
            self.info["resumed_from"] = {"finished_probes": sorted(self.probes),
                                         "finished_block_probes": sorted(self.block_probes),
                                         "finished_block_spectra": len(self.block_spectra),
                                         "checkpoint_steps": {str(k): v for k, v in checkpoints.items()}}

    def _keep_previous(self) -> None:
        """An earlier invocation's record stays (num_params, eps, its calibration, a summary until the finish
        rewrites it): a resume never writes less than it read. Only how that invocation ended is dropped; its
        groups timeline (times from its own start) moves to ``earlier_groups``, and the probes' groups and
        moves add up."""
        previous = self.previous
        for name, value in previous.items():
            if name not in ENDED_KEYS and name not in self.info:
                self.info[name] = value
        if previous.get("groups"):
            self.info["earlier_groups"] = [*previous.get("earlier_groups", []),
                                           {"started_at": previous.get("started_at"), "groups": previous["groups"]}]
        self.info["probe_groups"] = dict(previous.get("probe_groups") or {})
        self.info["probes_moved"] = int(previous.get("probes_moved") or 0)

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
        self.save_info()

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
        self.save_info()

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
        write_json(self.path("run.json"), self.info)

    # -- results --------------------------------------------------------------------------------------------
    def add_probe(self, result: ProbeResult, *, group: int) -> None:
        self.probes[result.probe_id] = {"alphas": result.alphas, "betas": result.betas}
        self.info["probe_groups"][str(result.probe_id)] = group
        self.hvp_seconds += result.hvp_seconds
        self.step_seconds += result.step_seconds
        self.checkpoint_seconds += sum(result.checkpoint_seconds)
        # the calibration counted the HVP that this probe reused as its first step
        self.hvp_count += len(result.hvp_seconds) - int(result.reused_first_matvec)
        self.write_lanczos_tables()
        # the probe is now final rows of the tables: its checkpoint is no longer needed
        shutil.rmtree(self.checkpoint_dir(result.probe_id), ignore_errors=True)
        self.save_info()

    def add_block_probe(self, result: BlockResult) -> None:
        self.block_probes[result.probe_id] = as_dict(result)
        self.hvp_count += result.hvp_count
        self.write_block_table()
        self.save_info()

    def add_block_spectrum(self, result: BlockSpectrumResult) -> None:
        rule = ritz_rule(result.alphas, result.betas)
        self.block_spectra[(result.block, result.probe_id)] = {
            "values": rule.values.tolist(), "weights": rule.weights.tolist(), "block_size": result.block_size}
        self.hvp_count += result.hvp_count
        self.write_block_ritz_table()
        self.save_info()

    def write_block_ritz_table(self) -> None:
        cols = {"block": [], "probe_id": [], "value": [], "weight": [], "block_size": []}
        for (block, pid), res in self.block_spectra.items():
            n = len(res["values"])
            cols["block"] += [block] * n
            cols["probe_id"] += [pid] * n
            cols["value"] += res["values"]
            cols["weight"] += res["weights"]
            cols["block_size"] += [res["block_size"]] * n
        write_table(self.path("block_ritz.parquet"), cols, schema=BLOCK_RITZ_SCHEMA, config_json=self.config_json)

    def write_lanczos_tables(self) -> None:
        ids = sorted(self.probes)
        cols = {"probe_id": [], "step": [], "alpha": [], "beta": []}
        ritz = {"probe_id": [], "value": [], "weight": [], "residual": []}
        for pid in ids:
            res = self.probes[pid]
            n = len(res["alphas"])
            cols["probe_id"] += [pid] * n
            cols["step"] += list(range(n))
            cols["alpha"] += res["alphas"]
            cols["beta"] += res["betas"]
            rule = ritz_rule(res["alphas"], res["betas"])
            ritz["probe_id"] += [pid] * len(rule.values)
            ritz["value"] += rule.values.tolist()
            ritz["weight"] += rule.weights.tolist()
            ritz["residual"] += rule.residuals.tolist()
        write_table(self.path("lanczos.parquet"), cols, schema=LANCZOS_SCHEMA, config_json=self.config_json)
        write_table(self.path("ritz.parquet"), ritz, schema=RITZ_SCHEMA, config_json=self.config_json)

    def write_block_table(self) -> None:
        cols = {"probe_id": [], "block": [], "rel_error": [], "cosine": [], "whole_rel_error": []}
        for pid in sorted(self.block_probes):
            res = self.block_probes[pid]
            n = len(res["blocks"])
            cols["probe_id"] += [pid] * n
            cols["block"] += res["blocks"]
            cols["rel_error"] += res["rel_error"]
            cols["cosine"] += res["cosine"]
            cols["whole_rel_error"] += [res["whole_rel_error"]] * n
        write_table(self.path("blocks.parquet"), cols, schema=BLOCKS_SCHEMA, config_json=self.config_json)

    def complete(self, *, failures_recovered: int) -> None:
        self.info["worker_failures_recovered"] = failures_recovered
        ensure_held(self.out)  # deletes, then writes: not in a folder another run took over
        shutil.rmtree(self.path(CHECKPOINTS), ignore_errors=True)
        self.phase("finish")
        self.finish()
        self.phase("done")
        self.info["status"] = "complete"
        self.info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save_info()

    def failed(self, err: BaseException) -> None:
        self.info["status"] = "failed"
        text = str(err).strip()
        self.info["error"] = f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"
        try:
            if self.probes or self.block_probes or self.block_spectra:
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
            if self.probes or self.block_probes:
                self.finish()
        finally:
            self.save_info()

    def finish(self) -> None:
        """Summary, density table and plots from what the probes produced."""
        if self.probes:
            rules = [ritz_rule(p["alphas"], p["betas"]) for _, p in sorted(self.probes.items())]
            trace = trace_estimate(rules, dimension=self.info["num_params"])
            ext = extreme_eigenvalues(rules)
            self.info["summary"] = {
                "lambda_max": ext.lambda_max, "lambda_max_residual": ext.lambda_max_residual,
                "lambda_min": ext.lambda_min, "lambda_min_residual": ext.lambda_min_residual,
                "trace": trace.trace, "trace_stderr": None if np.isnan(trace.stderr) else trace.stderr,
                "probes": len(rules),
            }
            # error bars: Ritz residual + the FD HVP's Weyl bound (hessian_core.error_bars)
            relative = (self.info.get("eps_calibration") or {}).get("relative_error")
            self.info["summary"].update(summary_error_fields(self.info["summary"], hvp_relative_error=relative))
            if self.config.density.enabled:
                measure = SpectralMeasure.from_rules(rules)
                dens = smoothed_density(measure, grid_size=self.config.density.grid_size)
                self.info["density"] = {"sigma": dens.sigma, "sigma_rule": f"{SIGMA_FRACTION} * (max - min Ritz value)"}
                write_table(self.path("density.parquet"), {"value": dens.grid, "density": dens.density},
                            schema=DENSITY_SCHEMA, config_json=self.config_json)
        if self.block_probes:
            self.info["blocks"] = block_summary(read_table(self.path("blocks.parquet")).to_pandas())
        if self.block_spectra:
            self.info["block_spectra"] = block_spectra_summary(read_table(self.path("block_ritz.parquet")).to_pandas())
        draw_plots(self.out)


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


def block_densities(df, *, grid: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Each block's probe-averaged SLQ density on ``grid`` (Gaussian of width sigma), scaled by its share
    block_size / sum of sizes: the scaled densities add up to the spectrum of the block-diagonal approximation."""
    total = float(df.groupby("block", sort=False).block_size.first().sum())
    out = {}
    for block, rows in df.groupby("block", sort=False):
        probes = rows.probe_id.nunique()
        z = (grid[:, None] - rows.value.to_numpy()[None, :]) / sigma
        dens = (np.exp(-0.5 * z * z) * (rows.weight.to_numpy() / probes)[None, :]).sum(axis=1)
        out[block] = dens / (sigma * np.sqrt(2 * np.pi)) * float(rows.block_size.iloc[0]) / total
    return out


def draw_plots(run_dir: str) -> list[str]:
    """(Re)draw every plot whose table exists; returns the files written."""
    from .plots import plot_blocks, plot_density

    written = []
    density_path = os.path.join(run_dir, "density.parquet")
    ritz_path = os.path.join(run_dir, "ritz.parquet")
    info = read_json(os.path.join(run_dir, "run.json")) or {}
    wanted = ((info.get("config") or {}).get("density") or {}).get("enabled", True)
    if os.path.exists(ritz_path) and (wanted or os.path.exists(density_path)):
        ritz = read_table(ritz_path).to_pandas()
        probes = ritz.probe_id.nunique()
        title = f"Hessian spectral density ({probes} probe{'s' if probes != 1 else ''})"
        if os.path.exists(density_path):
            dens = read_table(density_path).to_pandas()
            grid, density = dens.value.to_numpy(), dens.density.to_numpy()
        else:  # a run stopped before its end: the density of the probes it finished, not written as a table
            grid, density = _density_of(ritz)
            title += ", partial run"
        measure = SpectralMeasure.from_rules(_rules_of(ritz))
        overlay = None
        block_ritz_path = os.path.join(run_dir, "block_ritz.parquet")
        if os.path.exists(block_ritz_path):
            sigma = SIGMA_FRACTION * (ritz.value.max() - ritz.value.min()) or 1e-3
            overlay = block_densities(read_table(block_ritz_path).to_pandas(), grid=grid, sigma=float(sigma))
        plot_density(os.path.join(run_dir, "density.png"), grid=grid, density=density,
                     ritz_values=ritz.value.to_numpy(), title=title, atoms=(measure.values, measure.weights),
                     bulk=bulk_interval(measure), blocks=overlay)
        written.append("density.png")
    blocks_path = os.path.join(run_dir, "blocks.parquet")
    if os.path.exists(blocks_path):
        df = read_table(blocks_path).to_pandas()
        names = list(dict.fromkeys(df.block))
        rel = df.pivot(index="probe_id", columns="block", values="rel_error")[names].to_numpy()
        cos = df.pivot(index="probe_id", columns="block", values="cosine")[names].to_numpy()
        plot_blocks(os.path.join(run_dir, "blocks.png"), blocks=names, rel_error=rel, cosine=cos,
                    title="Block-diagonal approximation: per-block error of H v")
        written.append("blocks.png")
    return written


def _rules_of(ritz) -> list:
    from hessian_core import RitzRule

    return [RitzRule(g.value.to_numpy(), g.weight.to_numpy(), g.residual.to_numpy())
            for _, g in ritz.sort_values(["probe_id", "value"]).groupby("probe_id")]


def _density_of(ritz) -> tuple[np.ndarray, np.ndarray]:
    dens = smoothed_density(SpectralMeasure.from_rules(_rules_of(ritz)), grid_size=1000)
    return dens.grid, dens.density
