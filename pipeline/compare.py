"""``hessian-spectrum compare RUN_DIR...``: summary statistics of several runs and their distance to the first.

The statistics and the distance are defined in hessian_core.statistics. Writes compare.parquet (one row per
run) and compare.png (the densities overlaid, linear and log) to the output folder, and prints the table.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hessian_core import RitzRule, SpectralMeasure, smoothed_density
from hessian_core.statistics import spectral_distance, spectrum_statistics

from .config import ConfigError
from .tables import atomic_write


def load_rules(run_dir: str) -> tuple[list[RitzRule], dict]:
    path = os.path.join(run_dir, "ritz.parquet")
    info_path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path) or not os.path.exists(info_path):
        raise ConfigError(f"{run_dir!r} is not a run folder with results (no ritz.parquet or run.json)")
    with open(info_path) as f:
        info = json.load(f)
    df = pq.read_table(path).to_pandas()
    rules = [RitzRule(g.value.to_numpy(), g.weight.to_numpy(), g.residual.to_numpy())
             for _, g in df.sort_values(["probe_id", "value"]).groupby("probe_id")]
    return rules, info


def compare(run_dirs: list[str], *, out_dir: str) -> list[dict]:
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    loaded = [load_rules(d) for d in run_dirs]
    reference = SpectralMeasure.from_rules(loaded[0][0])
    rows = []
    for run_dir, (rules, info) in zip(run_dirs, loaded):
        stats = spectrum_statistics(rules, dimension=info["num_params"])
        rows.append({"run": run_dir, **stats.as_dict(),
                     "distance_to_reference": spectral_distance(SpectralMeasure.from_rules(rules), reference),
                     "probes": len(rules), "eps": info.get("eps")})
    os.makedirs(out_dir, exist_ok=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {b"hessian_spectrum.reference": run_dirs[0].encode()})
    atomic_write(os.path.join(out_dir, "compare.parquet"), lambda tmp: pq.write_table(table, tmp))
    _plot(os.path.join(out_dir, "compare.png"), run_dirs, [r for r, _ in loaded])
    print(format_compare(rows))
    return rows


def _plot(path: str, names: list[str], rules_per_run: list[list[RitzRule]]) -> None:
    from .plots import _pyplot

    plt = _pyplot()
    fig, (lin, log) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rules in zip(names, rules_per_run):
        d = smoothed_density(SpectralMeasure.from_rules(rules), grid_size=2000)
        label = os.path.basename(os.path.normpath(name))
        lin.plot(d.grid, d.density, lw=1.1, label=label)
        log.plot(d.grid, np.maximum(d.density, 1e-300), lw=1.1, label=label)
    log.set_yscale("log")
    top = log.get_ylim()[1]
    log.set_ylim(top * 1e-9, top)
    for ax in (lin, log):
        ax.set_xlabel("eigenvalue")
    lin.set_ylabel("density")
    lin.legend(fontsize=8)
    fig.suptitle(f"Hessian spectral densities (reference: {os.path.basename(os.path.normpath(names[0]))})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def format_compare(rows: list[dict]) -> str:
    cols = ["lambda_max", "lambda_min", "trace", "negative_mass", "bulk_upper", "outlier_count", "outlier_mass",
            "distance_to_reference"]
    lines = [f"{'run':<28}" + "".join(f"{c:>14}" for c in cols)]
    for r in rows:
        name = os.path.basename(os.path.normpath(r["run"]))[:27]
        lines.append(f"{name:<28}" + "".join(f"{r[c]:>14.5g}" for c in cols))
    return "\n".join(lines)
