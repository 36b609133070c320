"""The text summary of a run (``format_summary``): what ``run`` and ``show`` print and the report embeds."""

from __future__ import annotations


def format_summary(info: dict, run_dir: str | None = None) -> str:
    """The summary of run.json; with ``run_dir``, the first line says what became of the run and what it holds."""
    if run_dir is not None:
        from .run_state import describe_run

        lines = [describe_run(run_dir, info)]
    else:
        lines = [f"status: {info.get('status')}" + (f" ({info['error']})" if info.get("error") else "")]
    if "num_params" in info:
        lines.append(f"parameters: {info['num_params']:,}")
    if "eps" in info:
        lines.append(f"eps: {info['eps']:.4g}  ({info.get('eps_calibration', {}).get('message', '')})")
    s = info.get("summary")
    if s:
        from hessian_core.error_bars import extreme_error_bars, format_error_bar

        rel = s.get("hvp_relative_error", (info.get("eps_calibration") or {}).get("relative_error"))
        for name, bar in extreme_error_bars(s, hvp_relative_error=rel).items():
            lines.append(format_error_bar(name, bar))
        stderr = f" +- {s['trace_stderr']:.3g}" if s.get("trace_stderr") is not None else ""
        lines.append(f"trace: {s['trace']:.6g}{stderr}  ({s['probes']} probes)")
    b = info.get("blocks")
    if b:
        o = b["overall"]
        lines.append("block-diagonal analysis (mean +- std over probes):")
        lines.append(f"  {'block':<40} {'rel. error':>18} {'cosine':>18}")
        from .run_state import block_order

        for name in block_order(b):
            row = b["per_block"][name]
            lines.append(f"  {name:<40} {row['rel_error_mean']:>9.3f} +- {row['rel_error_std']:<5.3f} "
                         f"{row['cosine_mean']:>9.3f} +- {row['cosine_std']:<5.3f}")
        lines.append(f"  {'overall':<40} {o['rel_error_mean']:>9.3f} +- {o['rel_error_std']:<5.3f} "
                     f"{o['cosine_mean']:>9.3f} +- {o['cosine_std']:<5.3f}")
        lines.append(f"  whole block-diagonal approximation: relative error {o['whole_rel_error_mean']:.3f}")
    t = info.get("timing")
    if t:
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if v is not None]
        lines.append("timing: " + ", ".join(parts))
    return "\n".join(lines)
