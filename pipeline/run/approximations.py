"""The approximation study's names and summary (``blocks.approximations``): which curvature approximations a run
measures against the exact H v, and the mean +- std over probes of each one's errors for run.json, ``show``
and the report. The rank-side measurement is ``hessian_core.approximations``; the task is
``actors.records.ApproximationTask``."""

from __future__ import annotations

def approximation_summary(df) -> dict:
    """Per approximation (in the config's order): the whole-vector relative error and cosine of A v against H v,
    mean and std over the probes, and per block the same; ``order`` keeps the approximations' and blocks'
    order (run.json's keys are written sorted)."""
    out: dict = {"per_approximation": {}, "order": [], "block_order": []}
    for name, rows in df.groupby("approximation", sort=False):
        whole = rows.drop_duplicates("probe_id")
        per_block = rows.groupby("block", sort=False).agg(rel_error_mean=("rel_error", "mean"),
                                                          rel_error_std=("rel_error", "std"),
                                                          cosine_mean=("cosine", "mean"),
                                                          cosine_std=("cosine", "std"))
        out["per_approximation"][str(name)] = {
            "probes": int(whole.probe_id.nunique()),
            "whole_rel_error_mean": float(whole.whole_rel_error.mean()),
            "whole_rel_error_std": _std(whole.whole_rel_error),
            "whole_cosine_mean": float(whole.whole_cosine.mean()),
            "whole_cosine_std": _std(whole.whole_cosine),
            "per_block": {str(b): {k: _finite(v) for k, v in row.items()} for b, row in per_block.iterrows()}}
        out["order"].append(str(name))
        if not out["block_order"]:
            out["block_order"] = [str(b) for b in per_block.index]
    return out


def _std(series) -> float | None:
    return float(series.std()) if len(series) > 1 else None


def _finite(value) -> float | None:
    value = float(value)
    return value if value == value else None  # a one-probe std is NaN: null in run.json


def format_approximations(summary: dict) -> list[str]:
    """The study's table as ``show`` prints it: one line per approximation, whole-vector error and cosine."""
    lines = ["curvature approximations against the exact H v (mean +- std over probes):",
             f"  {'approximation':<34} {'rel. error of A v':>22} {'cosine':>22}"]
    for name in summary["order"]:
        row = summary["per_approximation"][name]
        lines.append(f"  {name:<34} {_pm(row['whole_rel_error_mean'], row['whole_rel_error_std']):>22} "
                     f"{_pm(row['whole_cosine_mean'], row['whole_cosine_std']):>22}")
    return lines


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" + (f" +- {std:.4f}" if std is not None else "")
