"""``hessian-spectrum compare RUN_DIR...``: summary statistics of several runs and their distance to the first.

The statistics and the distance are defined in hessian_core.statistics. Writes compare.parquet (one row per
run) and compare.png (the densities overlaid, linear and log) to the output folder, and prints the table.

Where the reference run saved eigenvectors (``eigen.k > 0``), every run that saved some for the same parameters
is also compared with it as subspaces: the overlap matrix |<u_i, u'_j>| (``eigen_overlap.parquet``) and the
principal angles between span(u) and span(u') (``principal_angles.parquet``), both printed. The vectors are read
from their DCP folders one parameter tensor at a time (hessian_core.saved_subspace_overlap), never whole.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hessian_core import RitzRule, SpectralMeasure, saved_subspace_overlap, smoothed_density
from hessian_core.statistics import spectral_distance, spectrum_statistics

from ..run.config import ConfigError
from ..run.plots import exclusive
from ..run.run_folder import RunFolder, RunInfo
from ..run.tables import atomic_write

EIGEN_OVERLAP = "eigen_overlap.parquet"
PRINCIPAL_ANGLES = "principal_angles.parquet"


def load_rules(run_dir: str) -> tuple[list[RitzRule], RunInfo]:
    """The run's Ritz rules (one per finished probe) and its run.json; ConfigError if it has neither."""
    folder = RunFolder(run_dir)
    info = folder.read_info()
    if info is None or not folder.has_spectrum():
        raise ConfigError(f"{run_dir!r} is not a run folder with results (no Ritz values or no run.json)")
    return folder.ritz_rules(), info


def _finished_with_spectrum(run_dir: str) -> bool:
    folder = RunFolder(run_dir)
    info = folder.read_info()
    return info is not None and info.status == "complete" and folder.has_spectrum()


def expand_run_dirs(paths: list[str]) -> list[str]:
    """Run folders as given, with a sweep folder replaced by its finished points in grid order."""
    out = []
    for path in paths:
        record = RunFolder(path).sweep_record()
        if record is not None:
            names = record["points"]
            found = [os.path.join(path, n) for n in names if _finished_with_spectrum(os.path.join(path, n))]
            if not found:
                raise ConfigError(f"sweep folder {path!r} has no finished points with a spectrum yet")
            out += found
        else:
            out.append(path)
    return out


def _leave_out_partial(run_dirs: list[str], *, include_partial: bool) -> list[str]:
    from ..run.progress import log
    from ..run.run_state import describe_run

    kept = []
    for run_dir in run_dirs:
        info = RunFolder(run_dir).read_info()
        if info is None or info.status == "complete":
            kept.append(run_dir)  # not a run folder: load_rules says so
        elif include_partial:
            log(f"compare: including the partial run {run_dir} ({describe_run(run_dir, info)})")
            kept.append(run_dir)
        else:
            log(f"compare: leaving out {run_dir}, which is not complete ({describe_run(run_dir, info)}); "
                f"--include-partial compares what it holds")
    if not kept:
        raise ConfigError("compare: none of the runs is complete; pass --include-partial to compare what they hold")
    return kept


def _pick_reference(run_dirs: list[str], reference: str | None) -> list[str]:
    """Move the reference run to the front; it may be named by path or by folder name."""
    if reference is None:
        return run_dirs
    matches = [i for i, d in enumerate(run_dirs) if os.path.normpath(d) == os.path.normpath(reference)]
    if not matches:
        matches = [i for i, d in enumerate(run_dirs) if os.path.basename(os.path.normpath(d)) == reference]
    if len(matches) > 1:
        raise ConfigError(f"--reference {reference!r} names {len(matches)} of the compared runs; give its path")
    if not matches:
        names = ", ".join(os.path.basename(os.path.normpath(d)) for d in run_dirs)
        raise ConfigError(f"--reference {reference!r} is not one of the compared runs ({names})")
    i = matches[0]
    return [run_dirs[i]] + run_dirs[:i] + run_dirs[i + 1:]


def compare(run_dirs: list[str], *, out_dir: str, reference: str | None = None,
            include_partial: bool = False) -> list[dict]:
    """Statistics of each run and its distance to the reference (default: the first run). Runs that are not
    complete (interrupted, killed, failed, still running) are left out, and named, unless ``include_partial``."""
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    run_dirs = _leave_out_partial(expand_run_dirs(run_dirs), include_partial=include_partial)
    run_dirs = _pick_reference(run_dirs, reference)
    loaded = [load_rules(d) for d in run_dirs]
    reference_measure = SpectralMeasure.from_rules(loaded[0][0])
    rows = []
    for run_dir, (rules, info) in zip(run_dirs, loaded):
        stats = spectrum_statistics(rules, dimension=info.num_params)
        rows.append({"run": os.path.abspath(run_dir), **stats.as_dict(),
                     "distance_to_reference": spectral_distance(SpectralMeasure.from_rules(rules), reference_measure),
                     "probes": len(rules), "eps": info.eps})
    os.makedirs(out_dir, exist_ok=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {b"hessian_spectrum.reference": os.path.abspath(run_dirs[0]).encode()})
    atomic_write(os.path.join(out_dir, "compare.parquet"), lambda tmp: pq.write_table(table, tmp))
    _plot(os.path.join(out_dir, "compare.png"), run_dirs, [r for r, _ in loaded])
    print(format_compare(rows))
    overlaps, angles = eigen_overlaps(run_dirs)
    for name, rows_of_run in ((EIGEN_OVERLAP, overlaps), (PRINCIPAL_ANGLES, angles)):
        path = os.path.join(out_dir, name)
        if rows_of_run:
            eigen_table = pa.Table.from_pylist(rows_of_run)
            atomic_write(path, lambda tmp, t=eigen_table: pq.write_table(t, tmp))
        elif os.path.exists(path):  # an earlier comparison's, of other runs
            os.remove(path)
    if overlaps:
        print(format_overlaps(overlaps, angles))
    return rows


def eigen_overlaps(run_dirs: list[str]) -> tuple[list[dict], list[dict]]:
    """(overlap rows, principal-angle rows) of every run's saved eigenvectors against the reference's (the first
    run); none where the reference saved none. A run without eigenvectors, or with other parameters, is named
    in the log and left out."""
    from ..run.progress import log

    reference = RunFolder(run_dirs[0]).eigenvectors_dir
    if not os.path.isdir(reference):
        return [], []
    overlaps, angles = [], []
    for run_dir in run_dirs:
        name = os.path.abspath(run_dir)
        folder = RunFolder(run_dir).eigenvectors_dir
        if not os.path.isdir(folder):
            log(f"compare: {run_dir} saved no eigenvectors: no subspace overlap for it")
            continue
        try:
            overlap = saved_subspace_overlap(reference, folder)
        except ValueError as e:
            log(f"compare: {e}: no subspace overlap for {run_dir}")
            continue
        overlaps += [{"run": name, "i": i, "j": j, "overlap": float(overlap.matrix[i, j])}
                     for i in range(overlap.matrix.shape[0]) for j in range(overlap.matrix.shape[1])]
        angles += [{"run": name, "index": n, "cosine": float(c), "angle_degrees": float(np.degrees(a))}
                   for n, (c, a) in enumerate(zip(overlap.cosines, overlap.angles))]
    return overlaps, angles


def format_overlaps(overlaps: list[dict], angles: list[dict]) -> str:
    """Per run: the overlap matrix (rows: the reference's eigenvectors u_i, columns: the run's u'_j) and the
    principal angles in degrees."""
    lines = ["eigenvector overlap |<u_i, u'_j>| with the reference (rows u_i: the reference's; columns u'_j: the "
             "run's) and the principal angles between the two subspaces"]
    for run in dict.fromkeys(r["run"] for r in overlaps):
        cells = [r for r in overlaps if r["run"] == run]
        rows, cols = max(r["i"] for r in cells) + 1, max(r["j"] for r in cells) + 1
        matrix = np.zeros((rows, cols))
        for r in cells:
            matrix[r["i"], r["j"]] = r["overlap"]
        lines.append(os.path.basename(os.path.normpath(run)))
        lines.append("      " + "".join(f"{'u' + chr(39) + str(j):>8}" for j in range(cols)))
        lines += [f"  u{i:<3}" + "".join(f"{matrix[i, j]:>8.4f}" for j in range(cols)) for i in range(rows)]
        degrees = [r["angle_degrees"] for r in angles if r["run"] == run]
        lines.append("  principal angles (degrees): " + " ".join(f"{d:.3g}" for d in degrees))
    return "\n".join(lines)


@exclusive
def _plot(path: str, names: list[str], rules_per_run: list[list[RitzRule]]) -> None:
    from ..run.plots import _pyplot

    plt = _pyplot()
    fig, (lin, log) = plt.subplots(1, 2, figsize=(11, 4))
    peak = 0.0
    for name, rules in zip(names, rules_per_run):
        d = smoothed_density(SpectralMeasure.from_rules(rules), grid_size=2000)
        label = os.path.basename(os.path.normpath(name))
        lin.plot(d.grid, d.density, lw=1.1, label=label)
        log.plot(d.grid, np.maximum(d.density, 1e-300), lw=1.1, label=label)
        peak = max(peak, float(d.density.max()))
    log.set_yscale("log")
    # from the densities themselves: autoscaling a log axis over the 1e-300 floor can leave every curve off it
    log.set_ylim(peak * 1e-9, peak * 2)
    for ax in (lin, log):
        ax.set_xlabel("eigenvalue")
    lin.set_ylabel("density")
    lin.legend(fontsize=8)
    fig.suptitle(f"Spectral densities (reference: {os.path.basename(os.path.normpath(names[0]))})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def format_compare(rows: list[dict]) -> str:
    cols = ["lambda_max", "lambda_min", "trace", "negative_mass", "bulk_upper", "outlier_count", "outlier_mass",
            "distance_to_reference"]
    widths = [max(12, len(c) + 2) for c in cols]
    lines = [f"{'run':<28}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    for r in rows:
        name = os.path.basename(os.path.normpath(r["run"]))[:27]
        lines.append(f"{name:<28}" + "".join(f"{r[c]:>{w}.5g}" for c, w in zip(cols, widths)))
    return "\n".join(lines)
