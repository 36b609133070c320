"""The text summary of a run (``format_summary``): what ``run`` and ``show`` print and the report embeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..run.run_folder import RunInfo


def format_summary(info: RunInfo | dict, run_dir: str | None = None) -> str:
    """The summary of run.json; with ``run_dir``, the first line says what became of the run and what it holds."""
    from ..run.run_folder import RunInfo

    info = info if isinstance(info, RunInfo) else RunInfo.from_dict(info)
    if run_dir is not None:
        from ..run.run_state import describe_run

        lines = [describe_run(run_dir, info)]
    else:
        lines = [f"status: {info.status}" + (f" ({info.error})" if info.error else "")]
    if info.num_params is not None:
        lines.append(f"parameters: {info.num_params:,}")
    if info.eps is not None:
        lines.append(f"eps: {info.eps:.4g}  ({(info.eps_calibration or {}).get('message', '')})")
    s = info.summary
    if s:
        from hessian_core.error_bars import extreme_error_bars, format_error_bar

        rel = s.get("hvp_relative_error", info.hvp_relative_error)
        for name, bar in extreme_error_bars(s, hvp_relative_error=rel).items():
            lines.append(format_error_bar(name, bar))
        stderr = f" +- {s['trace_stderr']:.3g}" if s.get("trace_stderr") is not None else ""
        lines.append(f"trace: {s['trace']:.6g}{stderr}  ({s['probes']} probes)")
    t = info.trace
    if t:
        what = "sketch vectors" if t.get("estimator") == "hutchpp" else "eigenpairs"
        lines.append(f"trace ({t.get('estimator')}): {t['trace']:.6g} +- {t['stderr']:.3g}  ({t['sketch']} {what}, "
                     f"{t['samples']} samples, {t['hvps']} HVPs)")
    auto = info.to_dict().get("probes_auto")
    if auto:
        lines.append(f"probes: {auto['probes']} ({auto['stopped']}; lanczos.probes: auto)")
    b = info.blocks
    if b:
        o = b["overall"]
        lines.append("block-diagonal analysis (mean +- std over probes):")
        lines.append(f"  {'block':<40} {'rel. error':>18} {'cosine':>18}")
        from ..run.run_state import block_order

        for name in block_order(b):
            row = b["per_block"][name]
            lines.append(f"  {name:<40} {row['rel_error_mean']:>9.3f} +- {row['rel_error_std']:<5.3f} "
                         f"{row['cosine_mean']:>9.3f} +- {row['cosine_std']:<5.3f}")
        lines.append(f"  {'overall':<40} {o['rel_error_mean']:>9.3f} +- {o['rel_error_std']:<5.3f} "
                     f"{o['cosine_mean']:>9.3f} +- {o['cosine_std']:<5.3f}")
        lines.append(f"  whole block-diagonal approximation: relative error {o['whole_rel_error_mean']:.3f}")
    if info.approximations:
        from ..run.approximations import format_approximations

        lines += format_approximations(info.approximations)
    e = info.eigen
    if e:
        lines.append(f"top-{e['k']} eigenpairs ({e['which']}): {e['converged']}/{e['k']} converged ({e['stopped']}) "
                     f"in {e['hvps']} HVPs, {e['restarts']} restarts")
        for i, (value, error) in enumerate(zip(e["eigenvalues"], e["errors"])):
            lines.append(f"  lambda_{i + 1} = {value:.6g} +- {error:.2g}")
        lines.append(f"  fraction of |grad L|^2 in their span: {e['gradient_fraction']:.4g}")
    t = info.timing
    if t:
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if v is not None]
        lines.append("timing: " + ", ".join(parts))
    return "\n".join(lines)
