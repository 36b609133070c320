"""A run's folder as a typed store: every file name in it, run.json read into ``RunInfo``, the finished results
read back (tables and the part files not yet compacted into them), the Ritz rules and densities, and the
writers of the result tables.

No other module opens a run folder's files by name (tests/pipeline/run/test_run_folder.py checks it). The lock
file is the one exception: ``output_lock`` names it, since it locks sweep folders too.

Recording stays flat as tasks grow: a finished task is one record appended to its table's part log
(``parts/``); the whole tables are rewritten, and the part logs they now hold deleted, only while that costs at
most 1/REWRITE_FACTOR of the time since the last rewrite, and always at the finish. Tables are written
atomically and a part record cut short by a kill is never read, so a kill at any point leaves complete tables
plus complete parts, which a resume reads back together (a row in both is one row). The eigen task, one a run,
writes its three tables whole when it finishes, and the eigenvectors' DCP folder (``eigenvectors/``) is its own.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa

from hessian_core import RitzRule, latest_complete_step, ritz_rule
from hessian_core.eigen_checkpoint import partial_folder
from hessian_core.quadrature import SIGMA_FRACTION, block_densities, rules_from_columns

from .config import ConfigError
from .output_lock import LOCK_NAME, ensure_held
from .tables import (APPROXIMATIONS_SCHEMA, TRACE_SCHEMA, BLOCK_RITZ_SCHEMA, BLOCKS_SCHEMA, DENSITY_SCHEMA, EIGEN_MASS_SCHEMA, EIGENPAIRS_SCHEMA,
                     LANCZOS_SCHEMA, LANDSCAPE_SCHEMA, RITZ_SCHEMA, read_json, read_table, write_json, write_table)

RUN_JSON = "run.json"
LANCZOS = "lanczos.parquet"
RITZ = "ritz.parquet"
DENSITY = "density.parquet"
BLOCKS = "blocks.parquet"
BLOCK_RITZ = "block_ritz.parquet"
DENSITY_PNG = "density.png"
BLOCKS_PNG = "blocks.png"
APPROXIMATIONS = "approximations.parquet"
TRACE = "trace.parquet"
APPROXIMATIONS_PNG = "approximations.png"
EIGENPAIRS = "eigenpairs.parquet"
EIGEN_MASS = "eigen_mass.parquet"
LANDSCAPE = "landscape.parquet"
EIGEN_MASS_PNG = "eigen_mass.png"
LANDSCAPE_PNG = "landscape.png"
EIGENVECTORS = "eigenvectors"  # a torch.distributed.checkpoint folder (hessian_core.save_eigenvectors)
EIGEN_CHECKPOINTS = "eigen"  # the eigen task's solver states, under CHECKPOINTS
PLOTS = (DENSITY_PNG, BLOCKS_PNG, APPROXIMATIONS_PNG, EIGEN_MASS_PNG, LANDSCAPE_PNG)
CHECKPOINTS = "checkpoints"
PARTS = "parts"  # finished tasks not yet compacted into the tables: one append-only log per table
PART_LOG_SUFFIX = ".arrows"
SWEEP_JSON = "sweep.json"  # a sweep folder's record: a run folder never holds one
CONFIG_YAML = "config.yaml"  # a sweep point's config, to resume the point alone
HVP_ERROR = "hvp-error"  # the hvp-error study's default folder inside a run's output_dir
# what --fresh removes (the checkpoints and parts are folders)
OUTPUT_FILES = (RUN_JSON, LANCZOS, RITZ, DENSITY, BLOCKS, BLOCK_RITZ, DENSITY_PNG, BLOCKS_PNG, EIGENPAIRS, EIGEN_MASS,
                LANDSCAPE, EIGEN_MASS_PNG, LANDSCAPE_PNG, APPROXIMATIONS, APPROXIMATIONS_PNG, TRACE)
# a task's table, written as a part per finished task; ritz.parquet follows from lanczos.parquet
PART_TABLES = {LANCZOS: LANCZOS_SCHEMA, BLOCKS: BLOCKS_SCHEMA, BLOCK_RITZ: BLOCK_RITZ_SCHEMA,
               APPROXIMATIONS: APPROXIMATIONS_SCHEMA}
REWRITE_FACTOR = 20  # the whole tables are rewritten when that costs <= 1/20 of the time since the last rewrite


@dataclass(kw_only=True)
class RunInfo:
    """run.json, typed. Keys this version does not know, and known keys holding null, stay in ``extra``:
    ``to_dict`` gives back every key read, so a resume never writes less than it read."""

    status: str | None = None
    config: dict = field(default_factory=dict)
    num_params: int | None = None
    eps: float | None = None
    eps_calibration: dict | None = None  # the Calibration record
    summary: dict | None = None
    density: dict | None = None
    blocks: dict | None = None
    block_spectra: dict | None = None
    approximations: dict | None = None  # the approximation study's summary (pipeline.run.approximations)
    trace: dict | None = None  # the Hutch++ trace task's estimate (trace.estimator: hutchpp)
    eigen: dict | None = None  # the eigen task's summary (Recorder.add_eigen)
    timing: dict | None = None
    groups: list | None = None
    probe_groups: dict | None = None
    probes_moved: int | None = None
    error: str | None = None
    signal: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> RunInfo:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name != "extra" and getattr(self, f.name) is not None})
        return out

    @property
    def probes(self) -> int:
        """The SLQ probes its config asks for (with ``probes: auto``, the most it may take)."""
        lanczos = self.config.get("lanczos") or {}
        probes = lanczos.get("probes", 0)
        return int(lanczos.get("max_probes", 64) if probes == "auto" else probes)

    @property
    def block_probes(self) -> int | None:
        """The block probes its config asks for, None without the block analysis."""
        blocks = self.config.get("blocks") or {}
        return blocks.get("probes") if blocks.get("enabled") else None

    @property
    def density_wanted(self) -> bool:
        return bool((self.config.get("density") or {}).get("enabled", True))

    @property
    def hvp_relative_error(self) -> float | None:
        return (self.eps_calibration or {}).get("relative_error")

    @property
    def grad_seconds(self) -> float | None:
        return (self.timing or {}).get("grad_seconds")


@dataclass(frozen=True, kw_only=True)
class BlockSpectrum:
    """One (block, probe)'s rule of H_bb as block_ritz.parquet keeps it."""

    values: list[float]
    weights: list[float]
    block_size: int


class RunFolder:
    """The files of one run folder. Reading never writes; the writers refuse a folder whose lock was lost."""

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def checkpoint_dir(self, probe_id: int) -> str:
        return os.path.abspath(os.path.join(self.path, CHECKPOINTS, f"probe-{probe_id:05d}"))

    @property
    def eigen_checkpoint_dir(self) -> str:
        """The eigen task's solver states (hessian_core.eigen_checkpoint)."""
        return os.path.abspath(os.path.join(self.path, CHECKPOINTS, EIGEN_CHECKPOINTS))

    @property
    def eigenvectors_dir(self) -> str:
        """The eigenvectors' torch.distributed.checkpoint folder (hessian_core.save_eigenvectors)."""
        return os.path.abspath(self.file(EIGENVECTORS))

    @property
    def lock_path(self) -> str:
        return self.file(LOCK_NAME)

    @property
    def hvp_error_dir(self) -> str:
        return self.file(HVP_ERROR)

    # -- run.json -------------------------------------------------------------------------------------------
    def has_run(self) -> bool:
        return os.path.exists(self.file(RUN_JSON))

    def holds_sweep(self) -> bool:
        return os.path.exists(self.file(SWEEP_JSON))

    def read_info(self) -> RunInfo | None:
        """run.json, or None if it is missing or unreadable (a run that never started)."""
        data = read_json(self.file(RUN_JSON))
        return None if data is None else RunInfo.from_dict(data)

    def info(self, *, what: str = "") -> RunInfo:
        """run.json, or ConfigError naming the folder (``what``: the option that gave it, e.g. "--from ")."""
        info = self.read_info()
        if info is None:
            raise ConfigError(f"{what}{self.path!r} is not a run folder (no readable {RUN_JSON})")
        return info

    def write_info(self, info: dict) -> None:
        write_json(self.file(RUN_JSON), info)

    # -- a sweep's folder: points that are run folders -------------------------------------------------------
    def sweep_record(self) -> dict | None:
        """sweep.json's content when this is a sweep's folder (and not a run's), else None."""
        return None if self.has_run() else read_json(self.file(SWEEP_JSON))

    def write_sweep_record(self, record: dict) -> None:
        write_json(self.file(SWEEP_JSON), record)

    def point(self, name: str) -> RunFolder:
        """A sweep point's run folder."""
        return RunFolder(self.file(name))

    @property
    def point_config_path(self) -> str:
        """config.yaml of a sweep point, which resumes the point alone."""
        return self.file(CONFIG_YAML)

    # -- housekeeping ---------------------------------------------------------------------------------------
    def remove_temporaries(self) -> None:
        """Temporaries of writes that a crash interrupted (never a complete file)."""
        for folder in (self.path, self.file(PARTS)):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.unlink(os.path.join(folder, name))

    def clear(self) -> None:
        """What --fresh removes: the results, plots, parts and checkpoints."""
        for name in OUTPUT_FILES:
            if os.path.exists(self.file(name)):
                os.unlink(self.file(name))
        shutil.rmtree(self.file(PARTS), ignore_errors=True)
        shutil.rmtree(self.file(CHECKPOINTS), ignore_errors=True)
        for folder in (self.eigenvectors_dir, partial_folder(self.eigenvectors_dir)):
            shutil.rmtree(folder, ignore_errors=True)

    def remove_checkpoint(self, probe_id: int) -> None:
        shutil.rmtree(self.checkpoint_dir(probe_id), ignore_errors=True)

    def remove_eigen_checkpoint(self) -> None:
        shutil.rmtree(self.eigen_checkpoint_dir, ignore_errors=True)

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.file(CHECKPOINTS), ignore_errors=True)

    def checkpoint_steps(self, probe_ids: Iterable[int]) -> dict[int, int]:
        """The latest complete checkpointed step of each of ``probe_ids`` that has one."""
        steps = {}
        for pid in probe_ids:
            found = latest_complete_step(self.checkpoint_dir(pid))
            if found is not None:
                steps[pid] = found[0]
        return steps

    # -- finished results -----------------------------------------------------------------------------------
    def _rows(self, table: str) -> list[dict]:
        """The table's rows, then those of its parts in the order written (older first)."""
        path = self.file(table)
        rows = read_table(path).to_pylist() if os.path.exists(path) else []
        for part in self._parts(table):
            rows += part.to_pylist()
        return rows

    def _part_log(self, table: str) -> str:
        return os.path.join(self.file(PARTS), table.removesuffix(".parquet") + PART_LOG_SUFFIX)

    def _parts(self, table: str) -> list[pa.Table]:
        """The part records appended for ``table`` since its last rewrite, one per finished task."""
        path = self._part_log(table)
        return read_part_log(path)[0] if os.path.exists(path) else []

    def lanczos_probes(self) -> dict[int, dict]:
        """probe id -> {"alphas": [...], "betas": [...]} of every finished SLQ probe."""
        by_probe: dict[int, list[dict]] = {}
        for row in self._rows(LANCZOS):
            by_probe.setdefault(int(row["probe_id"]), {})[int(row["step"])] = row
        return {pid: {"alphas": [steps[k]["alpha"] for k in sorted(steps)],
                      "betas": [steps[k]["beta"] for k in sorted(steps)]}
                for pid, steps in sorted(by_probe.items())}

    def block_probes(self) -> dict[int, dict]:
        """probe id -> its block-diagonal errors (BlockResult's fields) of every finished block probe."""
        by_probe: dict[int, dict] = {}
        for row in self._rows(BLOCKS):
            pid = int(row["probe_id"])
            found = by_probe.get(pid)
            if found is None or row["block"] in found["blocks"]:  # a part repeats a row the table holds
                found = by_probe[pid] = {"probe_id": pid, "blocks": [], "rel_error": [], "cosine": [],
                                         "whole_rel_error": float(row["whole_rel_error"])}
            found["blocks"].append(row["block"])
            found["rel_error"].append(row["rel_error"])
            found["cosine"].append(row["cosine"])
        return dict(sorted(by_probe.items()))

    def approximation_probes(self) -> dict[int, list[dict]]:
        """probe id -> its rows of approximations.parquet (APPROXIMATIONS_SCHEMA), every finished study probe. A
        part that repeats a probe the table (or an earlier part) holds replaces it: each source holds whole probes."""
        path = self.file(APPROXIMATIONS)
        sources = [read_table(path).to_pylist()] if os.path.exists(path) else []
        sources += [part.to_pylist() for part in self._parts(APPROXIMATIONS)]
        by_probe: dict[int, list[dict]] = {}
        for rows in sources:
            fresh: dict[int, list[dict]] = {}
            for row in rows:
                fresh.setdefault(int(row["probe_id"]), []).append(row)
            by_probe.update(fresh)
        return dict(sorted(by_probe.items()))

    def has_trace(self) -> bool:
        """The Hutch++ trace task finished (its table is written whole, once)."""
        return os.path.exists(self.file(TRACE))

    def approximations_frame(self):
        """approximations.parquet as a DataFrame, None without it."""
        path = self.file(APPROXIMATIONS)
        return read_table(path).to_pandas() if os.path.exists(path) else None

    def block_spectra(self) -> dict[tuple[str, int], BlockSpectrum]:
        """(block, probe id) -> its rule, in the order they finished."""
        grouped: dict[tuple[str, int], list[dict]] = {}
        seen_in: dict[tuple[str, int], int] = {}
        sources = [read_table(self.file(BLOCK_RITZ)).to_pylist()] if os.path.exists(self.file(BLOCK_RITZ)) else []
        sources += [part.to_pylist() for part in self._parts(BLOCK_RITZ)]
        for k, rows in enumerate(sources):
            for row in rows:
                key = (row["block"], int(row["probe_id"]))
                if seen_in.setdefault(key, k) != k:  # written again by a later source: keep one copy
                    grouped.pop(key)
                    seen_in[key] = k
                grouped.setdefault(key, []).append(row)
        return {key: BlockSpectrum(values=[r["value"] for r in rows], weights=[r["weight"] for r in rows],
                                   block_size=int(rows[0]["block_size"])) for key, rows in grouped.items()}

    def _probe_ids(self, table: str) -> set[int]:
        tables = ([read_table(self.file(table))] if os.path.exists(self.file(table)) else []) + self._parts(table)
        return {int(p) for t in tables for p in t.column("probe_id").to_pylist()}

    def finished_probe_ids(self) -> set[int]:
        return self._probe_ids(LANCZOS)

    def finished_block_probe_ids(self) -> set[int]:
        return self._probe_ids(BLOCKS)

    def has_spectrum(self) -> bool:
        return os.path.exists(self.file(RITZ)) or bool(self._parts(LANCZOS))

    def ritz_rules(self) -> list[RitzRule]:
        """One rule per finished SLQ probe, in probe order: ritz.parquet, and the probes only in parts."""
        rules: dict[int, RitzRule] = {}
        if os.path.exists(self.file(RITZ)):
            cols = read_table(self.file(RITZ)).to_pydict()
            ids = sorted(set(cols["probe_id"]))
            rules.update(zip(ids, rules_from_columns(cols["probe_id"], cols["value"], cols["weight"],
                                                     cols["residual"])))
        if self._parts(LANCZOS):
            for pid, probe in self.lanczos_probes().items():
                if pid not in rules:
                    rules[pid] = ritz_rule(probe["alphas"], probe["betas"])
        return [rules[pid] for pid in sorted(rules)]

    def density_table(self) -> tuple[np.ndarray, np.ndarray] | None:
        """density.parquet's grid and density, None before the finish wrote it."""
        if not os.path.exists(self.file(DENSITY)):
            return None
        table = read_table(self.file(DENSITY))
        return table.column("value").to_numpy(), table.column("density").to_numpy()

    def block_densities(self, *, grid: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
        """The per-block densities of block_ritz.parquet (``quadrature.block_densities``), {} without it."""
        by_block: dict[str, list[RitzRule]] = {}
        sizes: dict[str, int] = {}
        for (block, _), spectrum in self.block_spectra().items():
            values, weights = np.asarray(spectrum.values), np.asarray(spectrum.weights)
            by_block.setdefault(block, []).append(RitzRule(values, weights, np.zeros_like(values)))
            sizes[block] = spectrum.block_size
        return block_densities(by_block, sizes, grid=grid, sigma=sigma) if by_block else {}

    def blocks_frame(self):
        """blocks.parquet as a DataFrame (per-block plots and summaries), None without it."""
        return read_table(self.file(BLOCKS)).to_pandas() if os.path.exists(self.file(BLOCKS)) else None

    def block_ritz_frame(self):
        path = self.file(BLOCK_RITZ)
        return read_table(path).to_pandas() if os.path.exists(path) else None

    # -- the eigen task's results (one task: its tables are written whole, eigenpairs.parquet last) ----------------
    def has_eigen(self) -> bool:
        """Whether the eigen task finished: eigenpairs.parquet, the last of its tables written, is in place."""
        return os.path.exists(self.file(EIGENPAIRS))

    def _frame(self, name: str):
        return read_table(self.file(name)).to_pandas() if os.path.exists(self.file(name)) else None

    def eigenpairs_frame(self):
        """eigenpairs.parquet as a DataFrame, None without it."""
        return self._frame(EIGENPAIRS)

    def eigen_mass_frame(self):
        """eigen_mass.parquet as a DataFrame, None without it."""
        return self._frame(EIGEN_MASS)

    def landscape_frame(self):
        """landscape.parquet as a DataFrame, None without it."""
        return self._frame(LANDSCAPE)

    def plot_path(self, name: str) -> str:
        """One of the run's plots (PLOTS) in this folder."""
        if name not in PLOTS:
            raise ValueError(f"not a plot of a run folder: {name!r}")
        return self.file(name)


def sigma_of(rules: list[RitzRule]) -> float:
    """The smoothing width of the blocks overlay: SIGMA_FRACTION of the spread of the run's Ritz values."""
    values = np.concatenate([r.values for r in rules])
    return float(SIGMA_FRACTION * (values.max() - values.min()) or 1e-3)


class TableWriter:
    """The result tables of one invocation: a part per finished task, the whole tables at most as often as
    REWRITE_FACTOR allows (and at ``compact``). Holds what earlier invocations finished, read back from the
    folder, so the tables it rewrites are whole."""

    def __init__(self, folder: RunFolder, *, config_json: str):
        self.folder = folder
        self.config_json = config_json
        self.probes = folder.lanczos_probes()
        self.block_probes = folder.block_probes()
        self.block_spectra = folder.block_spectra()
        self.approximation_probes = folder.approximation_probes()
        self._rules: dict[int, RitzRule] = {}
        self._dirty = {table for table in PART_TABLES if folder._parts(table)}  # rows only in parts yet
        for table in PART_TABLES:  # a record a kill cut short is dropped, so that appends follow whole ones
            path = folder._part_log(table)
            if os.path.exists(path) and read_part_log(path)[1] < os.path.getsize(path):
                ensure_held(path)
                os.truncate(path, read_part_log(path)[1])
        self._last_rewrite = float("-inf")  # the first finished task rewrites at once
        self._rewrite_seconds = 0.0

    def add_probe(self, probe_id: int, alphas: list[float], betas: list[float]) -> None:
        self.probes[probe_id] = {"alphas": list(alphas), "betas": list(betas)}
        self._record(LANCZOS, _lanczos_columns({probe_id: self.probes[probe_id]}))

    def add_block_probe(self, record: dict) -> None:
        self.block_probes[record["probe_id"]] = record
        self._record(BLOCKS, _blocks_columns({record["probe_id"]: record}))

    def add_block_spectrum(self, block: str, probe_id: int, spectrum: BlockSpectrum) -> None:
        self.block_spectra[(block, probe_id)] = spectrum
        self._record(BLOCK_RITZ, _block_ritz_columns({(block, probe_id): spectrum}))

    def add_approximation_probe(self, probe_id: int, rows: list[dict]) -> None:
        self.approximation_probes[probe_id] = rows
        self._record(APPROXIMATIONS, _approximation_columns({probe_id: rows}))

    def _record(self, table: str, columns: dict) -> None:
        """The task's rows on disk now: the whole tables if a rewrite is due, else one part."""
        self._dirty.add(table)
        if time.monotonic() - self._last_rewrite >= REWRITE_FACTOR * self._rewrite_seconds:
            self.compact()
            return
        os.makedirs(self.folder.file(PARTS), exist_ok=True)
        append_part(self.folder._part_log(table), pa.table(columns, schema=PART_TABLES[table]))

    def compact(self) -> None:
        """Rewrite the tables that gained rows since the last rewrite, then drop the parts (each is in a table
        now). The parts go last: a kill before then leaves rows in both, which read back as one."""
        started = time.monotonic()
        if LANCZOS in self._dirty:
            ordered = dict(sorted(self.probes.items()))
            write_table(self.folder.file(LANCZOS), _lanczos_columns(ordered), schema=LANCZOS_SCHEMA,
                        config_json=self.config_json)
            write_table(self.folder.file(RITZ), _ritz_columns({pid: self.rule(pid) for pid in ordered}),
                        schema=RITZ_SCHEMA, config_json=self.config_json)
        if BLOCKS in self._dirty:
            write_table(self.folder.file(BLOCKS), _blocks_columns(dict(sorted(self.block_probes.items()))),
                        schema=BLOCKS_SCHEMA, config_json=self.config_json)
        if APPROXIMATIONS in self._dirty:
            write_table(self.folder.file(APPROXIMATIONS),
                        _approximation_columns(dict(sorted(self.approximation_probes.items()))),
                        schema=APPROXIMATIONS_SCHEMA, config_json=self.config_json)
        if BLOCK_RITZ in self._dirty:
            write_table(self.folder.file(BLOCK_RITZ), _block_ritz_columns(self.block_spectra),
                        schema=BLOCK_RITZ_SCHEMA, config_json=self.config_json)
        shutil.rmtree(self.folder.file(PARTS), ignore_errors=True)
        self._dirty.clear()
        self._last_rewrite = time.monotonic()
        self._rewrite_seconds = self._last_rewrite - started

    def rule(self, probe_id: int) -> RitzRule:
        """A finished probe's rule, computed once."""
        if probe_id not in self._rules:
            probe = self.probes[probe_id]
            self._rules[probe_id] = ritz_rule(probe["alphas"], probe["betas"])
        return self._rules[probe_id]

    def rules(self) -> list[RitzRule]:
        """The finished probes' rules in probe order."""
        return [self.rule(pid) for pid in sorted(self.probes)]

    def write_eigen(self, *, pairs: dict, mass: dict, landscape: dict) -> None:
        """The eigen task's tables (columns as EIGENPAIRS_SCHEMA, EIGEN_MASS_SCHEMA, LANDSCAPE_SCHEMA), each whole;
        eigenpairs.parquet last: a kill before it leaves the task unfinished (``has_eigen``), and a resume
        rewrites the others."""
        write_table(self.folder.file(EIGEN_MASS), mass, schema=EIGEN_MASS_SCHEMA, config_json=self.config_json)
        write_table(self.folder.file(LANDSCAPE), landscape, schema=LANDSCAPE_SCHEMA, config_json=self.config_json)
        write_table(self.folder.file(EIGENPAIRS), pairs, schema=EIGENPAIRS_SCHEMA, config_json=self.config_json)

    def write_trace(self, *, span: float, samples: list[float]) -> None:
        """The Hutch++ task's table (TRACE_SCHEMA), whole: its existence marks the task finished."""
        write_table(self.folder.file(TRACE), {"kind": ["span"] + ["sample"] * len(samples),
                                              "index": [0] + list(range(len(samples))), "value": [span, *samples]},
                    schema=TRACE_SCHEMA, config_json=self.config_json)

    def write_density(self, grid: np.ndarray, density: np.ndarray) -> None:
        write_table(self.folder.file(DENSITY), {"value": grid, "density": density}, schema=DENSITY_SCHEMA,
                    config_json=self.config_json)


def append_part(path: str, table: pa.Table) -> None:
    """Append one record (an 8-byte little-endian length, then an Arrow IPC stream) to a part log: O(1) per
    task, where a Parquet table can only be rewritten whole."""
    ensure_held(path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    payload = sink.getvalue().to_pybytes()
    with open(path, "ab") as f:
        f.write(len(payload).to_bytes(8, "little") + payload)


def read_part_log(path: str) -> tuple[list[pa.Table], int]:
    """The whole records of a part log and their length in bytes; a record a kill cut short (its length or
    its stream incomplete) ends the log: it never reads as a task's rows."""
    with open(path, "rb") as f:
        data = f.read()
    tables, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 8], "little")
        if pos + 8 + size > len(data):
            break
        try:
            tables.append(pa.ipc.open_stream(data[pos + 8:pos + 8 + size]).read_all())
        except pa.ArrowInvalid:
            break
        pos += 8 + size
    return tables, pos


def _lanczos_columns(probes: dict[int, dict]) -> dict:
    cols = {"probe_id": [], "step": [], "alpha": [], "beta": []}
    for pid, res in probes.items():
        n = len(res["alphas"])
        cols["probe_id"] += [pid] * n
        cols["step"] += list(range(n))
        cols["alpha"] += res["alphas"]
        cols["beta"] += res["betas"]
    return cols


def _ritz_columns(rules: dict[int, RitzRule]) -> dict:
    cols = {"probe_id": [], "value": [], "weight": [], "residual": []}
    for pid, rule in rules.items():
        cols["probe_id"] += [pid] * len(rule.values)
        cols["value"] += rule.values.tolist()
        cols["weight"] += rule.weights.tolist()
        cols["residual"] += rule.residuals.tolist()
    return cols


def _blocks_columns(block_probes: dict[int, dict]) -> dict:
    cols = {"probe_id": [], "block": [], "rel_error": [], "cosine": [], "whole_rel_error": []}
    for pid, res in block_probes.items():
        n = len(res["blocks"])
        cols["probe_id"] += [pid] * n
        cols["block"] += res["blocks"]
        cols["rel_error"] += res["rel_error"]
        cols["cosine"] += res["cosine"]
        cols["whole_rel_error"] += [res["whole_rel_error"]] * n
    return cols


def _approximation_columns(probes: dict[int, list[dict]]) -> dict:
    rows = [row for pid in probes for row in probes[pid]]
    return {name: [row[name] for row in rows] for name in APPROXIMATIONS_SCHEMA.names}


def _block_ritz_columns(spectra: dict[tuple[str, int], BlockSpectrum]) -> dict:
    cols = {"block": [], "probe_id": [], "value": [], "weight": [], "block_size": []}
    for (block, pid), res in spectra.items():
        n = len(res.values)
        cols["block"] += [block] * n
        cols["probe_id"] += [pid] * n
        cols["value"] += res.values
        cols["weight"] += res.weights
        cols["block_size"] += [res.block_size] * n
    return cols
