"""``hessian-spectrum report FOLDER``: one self-contained report.html for a run, a sweep, a comparison or an
hvp-error study. Figures are embedded as PNG data URIs; tables, each run's config and software versions are
inline. The page loads nothing from anywhere, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import os
import time

import pyarrow.parquet as pq
import yaml

from ..run.config import ConfigError
from ..run.run_folder import (APPROXIMATIONS_PNG, BLOCKS_PNG, DENSITY_PNG, EIGEN_MASS_PNG, EIGENPAIRS, LANDSCAPE_PNG,
                              RunFolder, RunInfo)
from ..run.tables import atomic_text, read_json, writable_folder

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 0.7em; font-size: 0.8em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; } .failed { color: #b00; }
details { margin: 0.7em 0; } summary { cursor: pointer; font-weight: 600; }
table.key { font-size: 1em; } table.key td:nth-child(2) { font-weight: 600; font-variant-numeric: tabular-nums; }
table.key td:nth-child(3), table.key th:nth-child(3) { text-align: left; color: #555; }
"""


def _image(path: str, alt: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "" if value is None else str(value)


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _parquet_rows(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist() if os.path.exists(path) else []


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _config_and_versions(info: dict) -> str:
    """``info``: a run.json's or hvp_error.json's content."""
    parts = []
    if info.get("config"):
        parts.append("<details><summary>config</summary>" + _pre(yaml.safe_dump(info["config"], sort_keys=False))
                     + "</details>")
    if info.get("versions"):
        parts.append("<p>versions: " + html.escape(", ".join(f"{k} {v}" for k, v in info["versions"].items()))
                     + "</p>")
    return "".join(parts)


def _run_section(run_dir: str, info: RunInfo, *, heading: str) -> str:
    from ..run.run_state import block_order, describe_run
    from .summary import format_summary

    folder = RunFolder(run_dir)
    out = [f"<h2>{html.escape(heading)}</h2>"]
    if info.status != "complete":  # interrupted, killed, failed, running: say so, and what it holds
        out.append(f"<p class=\"failed\">{html.escape(describe_run(run_dir, info))}</p>")
    out += [_key_figures(run_dir, info),
            "<details><summary>full summary</summary>" + _pre(format_summary(info, run_dir)) + "</details>",
           _image(folder.plot_path(DENSITY_PNG), "spectral density"),
           _image(folder.plot_path(BLOCKS_PNG), "block-diagonal errors")]
    blocks = info.blocks
    if blocks:
        rows = [{"block": name, **blocks["per_block"][name]} for name in block_order(blocks)]
        rows.append({"block": "overall", **{k: v for k, v in blocks["overall"].items() if k != "whole_rel_error_mean"}})
        out.append(_table(rows, ["block", "rel_error_mean", "rel_error_std", "cosine_mean", "cosine_std"]))
    if info.approximations:
        study = info.approximations
        out += [_table([{"approximation": name, **{k: v for k, v in study["per_approximation"][name].items()
                                                   if k != "per_block"}} for name in study["order"]],
                       ["approximation", "whole_rel_error_mean", "whole_rel_error_std", "whole_cosine_mean",
                        "whole_cosine_std", "probes"]),
                _image(folder.plot_path(APPROXIMATIONS_PNG), "curvature approximations against the exact H v")]
    if info.eigen:
        out += [_table(_parquet_rows(folder.file(EIGENPAIRS)),
                       ["index", "eigenvalue", "error", "residual", "converged"]),
                _image(folder.plot_path(EIGEN_MASS_PNG), "eigenvector mass per block"),
                _image(folder.plot_path(LANDSCAPE_PNG), "loss along the top eigenvectors")]
    out.append(_config_and_versions(info.to_dict()))
    study = folder.hvp_error_dir
    if os.path.exists(os.path.join(study, "hvp_error.json")):
        out.append(_hvp_error_section(study, heading="HVP error against eps"))
    return "".join(out)


def _key_figures(run_dir: str, info: RunInfo) -> str:
    """The figures a reader wants first, as a table: the extremes with their Ritz residual bounds, the trace with
    its standard error, the bulk and what lies outside it, the negative mass, and eps with its estimated error."""
    from hessian_core.statistics import spectrum_statistics

    folder = RunFolder(run_dir)
    s = info.summary
    if not s or info.num_params is None or not folder.has_spectrum():
        return ""
    st = spectrum_statistics(folder.ritz_rules(), dimension=info.num_params)
    se = s.get("trace_stderr")
    cal = info.eps_calibration or {}
    err = cal.get("relative_error")
    rows = [
        ("lambda_max", f"{s['lambda_max']:.6g}", f"Ritz residual bound {s['lambda_max_residual']:.2g}"),
        ("lambda_min", f"{s['lambda_min']:.6g}", f"Ritz residual bound {s['lambda_min_residual']:.2g}"),
        ("trace", f"{s['trace']:.6g}" + (f" +- {se:.3g}" if se is not None else ""),
         f"{s['probes']} probes" + ("" if se is not None else " (one probe: no standard error)")),
        ("bulk", f"[{st.bulk_lower:.4g}, {st.bulk_upper:.4g}]", "extreme atoms where the density is >= 1e-3 of its peak"),
        ("outliers", f"{st.outlier_count:.3g} per probe", f"distinct converged Ritz values beyond the bulk; mass "
                                                             f"{st.outlier_mass:.3g} of the spectrum"),
        ("negative mass", f"{st.negative_mass:.3g}", "fraction of eigenvalues below -1% of the spread"),
        ("eps", f"{info.eps:.4g}" if info.eps is not None else "",
         f"estimated HVP relative error {err:.2g}" if isinstance(err, float) else cal.get("message", "")),
    ]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td><td>{html.escape(n)}</td></tr>"
                   for k, v, n in rows)
    return ("<div class=\"scroll\"><table class=\"key\"><thead><tr><th>key figure</th><th>value</th><th>note</th>"
            f"</tr></thead><tbody>{body}</tbody></table></div>")


def _hvp_error_section(folder: str, *, heading: str) -> str:
    info = read_json(os.path.join(folder, "hvp_error.json")) or {}
    rows = _parquet_rows(os.path.join(folder, "hvp_error.parquet"))
    s = info.get("summary", {})
    text = (f"auto eps {s.get('auto_eps', float('nan')):.3g} ({info.get('auto', {}).get('message', '')}); "
            f"most stable FD step {s.get('stable_eps', float('nan')):.3g}")
    if "min_eps" in s:
        text += (f"; best eps by {s['reference']}: error {s['min_rel_error']:.3g} at eps {s['min_eps']:.3g} "
                 f"({s['min_over_auto']:.2f}x the auto eps)")
    if info.get("exact_unavailable"):
        text += f"; no exact reference: {info['exact_unavailable']}"
    for scheme, other in list((info.get("schemes") or {}).items())[1:]:  # the first is the one above
        o = other.get("summary", {})
        text += f". {scheme}: auto eps {o.get('auto_eps', float('nan')):.3g} ({other.get('auto', {}).get('message', '')})"
        if "min_eps" in o:
            text += f", best error {o['min_rel_error']:.3g} at eps {o['min_eps']:.3g}"
    return "".join([f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>",
                    _image(os.path.join(folder, "hvp_error.png"), "HVP error against eps"), _table(rows),
                    _config_and_versions(info)])


def _compare_section(folder: str, *, heading: str) -> str:
    rows = _parquet_rows(os.path.join(folder, "compare.parquet"))
    if not rows:
        return ""
    for r in rows:
        r["run"] = os.path.basename(os.path.normpath(r["run"]))
    return "".join([f"<h2>{html.escape(heading)}</h2>",
                    f"<p>reference: {html.escape(rows[0]['run'])}; distance = W1 between the SLQ measures / the "
                    f"reference's lambda_max - lambda_min (see docs/studies.md, 'Comparisons')</p>",
                    _table(rows), _image(os.path.join(folder, "compare.png"), "densities overlaid"),
                    _subspace_section(folder)])


def _subspace_section(folder: str) -> str:
    """Each run's eigenvector overlap matrix with the reference and the principal angles (compare's tables)."""
    from ..studies.compare import EIGEN_OVERLAP, PRINCIPAL_ANGLES

    overlaps = _parquet_rows(os.path.join(folder, EIGEN_OVERLAP))
    if not overlaps:
        return ""
    angles = _parquet_rows(os.path.join(folder, PRINCIPAL_ANGLES))
    out = ["<h3>Eigenvector subspaces against the reference</h3>",
           "<p>|&lt;u_i, u'_j&gt;|: rows u_i are the reference's eigenvectors, columns u'_j the run's; then the "
           "principal angles between the two spans (degrees)</p>"]
    for run in dict.fromkeys(r["run"] for r in overlaps):
        cells = [r for r in overlaps if r["run"] == run]
        cols = [f"u'{j}" for j in range(max(r["j"] for r in cells) + 1)]
        matrix = [{"": f"u{i}", **{f"u'{r['j']}": r["overlap"] for r in cells if r["i"] == i}}
                  for i in range(max(r["i"] for r in cells) + 1)]
        out += [f"<h4>{html.escape(os.path.basename(os.path.normpath(run)))}</h4>", _table(matrix, ["", *cols]),
                _table([r for r in angles if r["run"] == run], ["index", "cosine", "angle_degrees"])]
    return "".join(out)


def build_report(folder: str) -> str:
    """The HTML text of the report for ``folder``; raises ConfigError if it holds nothing reportable."""
    run_folder = RunFolder(folder)
    run_info = run_folder.read_info()
    sweep_info = None if run_info is not None else run_folder.sweep_record()
    hvp_info = read_json(os.path.join(folder, "hvp_error.json"))
    body: list[str] = []
    if run_info is not None:
        title = f"Hessian spectrum: run {folder}"
        body.append(_run_section(folder, run_info, heading="Run"))
    elif sweep_info is not None:
        title = f"Hessian spectrum: sweep {folder}"
        grid = ", ".join(f"{k} in {{{', '.join(v)}}}" for k, v in sweep_info["grid"])
        body.append(f"<h2>Sweep</h2><p>{html.escape(grid)} over {html.escape(sweep_info['config_file'])}"
                    + (f" with {html.escape(' '.join(sweep_info['overrides']))}" if sweep_info["overrides"] else "")
                    + "</p>")
        body.append(_table(_parquet_rows(os.path.join(folder, "sweep.parquet"))))
        body.append(_compare_section(folder, heading="Comparison of the finished points"))
        for name in sweep_info["points"]:
            info = run_folder.point(name).read_info()
            if info is not None:
                body.append(_run_section(os.path.join(folder, name), info, heading=f"Point {name}"))
    elif hvp_info is not None:
        title = f"Hessian spectrum: HVP error study {folder}"
        body.append(_hvp_error_section(folder, heading="HVP error against eps"))
    elif os.path.exists(os.path.join(folder, "compare.parquet")):
        title = f"Hessian spectrum: comparison {folder}"
        body.append(_compare_section(folder, heading="Comparison"))
        for r in _parquet_rows(os.path.join(folder, "compare.parquet")):
            info = RunFolder(r["run"]).read_info()
            if info is not None:
                body.append(_run_section(r["run"], info, heading=f"Run {r['run']}"))
    else:
        raise ConfigError(f"{folder!r} holds no run, sweep, comparison or hvp-error results "
                          f"(run.json, sweep.json, compare.parquet or hvp_error.json)")
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>generated {html.escape(generated)} by hessian-spectrum report</p>{''.join(body)}</body></html>\n")


def write_report(folder: str, *, output: str | None = None) -> str:
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder")
    path = output or os.path.join(folder, "report.html")
    writable_folder(os.path.dirname(os.path.abspath(path)), what="report --output folder")
    text = build_report(folder)
    atomic_text(path, text)
    return path
