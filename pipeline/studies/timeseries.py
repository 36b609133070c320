"""Curvature over training: a Parquet time series (one row per analysed step, e.g. written by
``examples/fsdp_timeseries.py`` with ``hessian_core.append_row``) or a ``compare.parquet`` over checkpoints,
drawn as one panel per statistic against the step."""

from __future__ import annotations

import os
import re

import numpy as np

from ..run.config import ConfigError
from ..run.plots import exclusive
from ..run.tables import atomic_write

# statistics drawn when the table has them, in this order
PANELS = ("lambda_max", "lambda_min", "trace", "outlier_count", "whole_block_rel_error", "loss",
          "distance_to_reference")


def steps_of_runs(runs: list[str]) -> tuple[np.ndarray, list[str]]:
    """x positions of compared runs: the last integer of each run folder's name (checkpoint-1200 -> 1200) when
    every name has a distinct one, else the runs' order; and their labels."""
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    numbers = [re.findall(r"\d+", n) for n in names]
    if all(numbers) and len({int(n[-1]) for n in numbers}) == len(names):
        return np.array([int(n[-1]) for n in numbers], dtype=float), names
    return np.arange(len(names), dtype=float), names


def plot_timeseries(path: str, *, output: str | None = None) -> str:
    """Draw the statistics of a time-series Parquet (column ``step``) or a compare.parquet (column ``run``);
    returns the PNG written (default: beside the table, same name)."""
    import pyarrow.parquet as pq

    try:
        df = pq.read_table(path).to_pandas()
    except Exception as e:  # noqa: BLE001 - not a Parquet file
        raise ConfigError(f"{path!r} is not a readable Parquet table: {type(e).__name__}") from None
    if "step" in df.columns:
        df = df.sort_values("step")
        x, labels, xlabel = df["step"].to_numpy(dtype=float), None, "training step"
    elif "run" in df.columns:
        x, labels = steps_of_runs(df["run"].tolist())
        order = np.argsort(x, kind="stable")
        df, x, labels = df.iloc[order], x[order], [labels[i] for i in order]
        xlabel = "checkpoint"
    else:
        raise ConfigError(f"{path!r} has neither a 'step' column (a time series) nor a 'run' column (compare.parquet)")
    panels = [c for c in PANELS if c in df.columns and np.isfinite(df[c].to_numpy(dtype=float)).any()]
    if not panels:
        raise ConfigError(f"{path!r} has none of the columns {', '.join(PANELS)}")
    output = output or os.path.splitext(path)[0] + ".png"
    _draw(output, x, df, panels, labels=labels, xlabel=xlabel)
    return output


@exclusive
def _draw(output: str, x: np.ndarray, df, panels: list[str], *, labels: list[str] | None, xlabel: str) -> None:
    from ..run.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], panels):
        ax.plot(x, df[column].to_numpy(dtype=float), "o-", ms=3, lw=1.2)
        ax.set_ylabel(column.replace("_", " "), fontsize=8)
        ax.grid(alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xlabel(xlabel)
    if labels is not None:
        bottom.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle("Hessian spectrum over training")
    fig.tight_layout()
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
