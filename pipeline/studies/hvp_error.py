"""``hessian-spectrum hvp-error CONFIG [--eps ...] [--schemes ...]``: the FD HVP's error against the step eps (Theorem
3.1's U), for one or more difference schemes side by side.

On one group of the config's layout, along SLQ probe 0: the FD HVP at every eps and at the ``auto`` eps,
against the exact double-backward HVP (when the model is unsharded, i.e. ``cluster.num_workers: 1``, and its
attention has a double backward) and against the most stable FD HVP of the grid; plus the prediction of the
scheme's own eps rule (Theorem 3.1 for central, its O(eps) analogue for forward). ``--schemes`` (default: the
config's ``hvp.scheme``, then ``central`` and ``forward`` where they are not it) runs the study once per scheme on
the same grid and probe. Writes hvp_error.parquet (the first scheme's columns as before, then
``<scheme>_rel_error_exact``, ``<scheme>_rel_error_stable``, ``<scheme>_predicted_rel_error`` for each other one),
hvp_error.json (the first scheme's fields at the top, every scheme's under ``schemes``) and hvp_error.png (all
the U curves, log-log).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..run.config import ConfigError, RunConfig
from ..run.plots import exclusive
from ..run.run_folder import RunFolder
from ..run.tables import atomic_write, write_json

EPS_DECADES_BELOW, EPS_DECADES_ABOVE, EPS_PER_DECADE = 4, 2, 3
SCHEMA = pa.schema([("eps", pa.float64()), ("rel_error_exact", pa.float64()), ("rel_error_stable", pa.float64()),
                    ("predicted_rel_error", pa.float64()), ("perturbation_rounding", pa.float64())])
SCHEMES = ("central", "richardson", "forward")
# the columns each scheme after the first adds to hvp_error.parquet, prefixed with its name
SCHEME_COLUMNS = (("rel_error_exact", "rel_error_exact"), ("rel_error_stable", "rel_error_stable"),
                  ("predicted_rel_error", "predicted"))


def parse_schemes(text: str | None, config_scheme: str) -> list[str]:
    """``--schemes central,forward``; by default the config's ``hvp.scheme``, then central and forward (the
    forward U curve beside the central one). The first is the study's main scheme (top-level fields)."""
    if text is None:
        return list(dict.fromkeys([config_scheme, "central", "forward"]))
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in SCHEMES:
            raise ConfigError(f"--schemes: {name!r} is not a scheme; expected some of {', '.join(SCHEMES)}")
    if not names:
        raise ConfigError("--schemes needs at least one scheme, e.g. --schemes central,forward")
    return list(dict.fromkeys(names))


def parse_eps(text: str | None, dtype: str, compute_dtype: str | None = None) -> list[float]:
    """``--eps 1e-6,1e-5`` or, by default, 6 decades at 3 per decade around the dtypes' default step."""
    if text is None:
        import torch

        from hessian_core import default_eps

        centre = default_eps(getattr(torch, dtype), getattr(torch, compute_dtype) if compute_dtype else None)
        exponents = np.arange(-EPS_DECADES_BELOW * EPS_PER_DECADE, EPS_DECADES_ABOVE * EPS_PER_DECADE + 1)
        return [float(f"{centre * 10.0 ** (k / EPS_PER_DECADE):.3g}") for k in exponents]
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--eps: {part.strip()!r} is not a number; expected e.g. --eps 1e-6,1e-5,1e-4") from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--eps: {part.strip()!r} must be a positive finite number")
        values.append(value)
    if len(set(values)) < 2:
        raise ConfigError("--eps needs at least two distinct values")
    return sorted(set(values))


def summarize(study: dict) -> dict:
    """Where the error is smallest and how that compares with the auto eps.

    With the exact HVP: the measured minimum over the grid. Without it, the best step is estimated as the
    stable FD step itself (the finer step of the adjacent pair that agrees best); the error quoted is that
    pair's disagreement, an estimate, not an independent measurement.
    """
    eps = np.asarray(study["eps"])
    auto_eps = study["auto"]["eps"]
    out = {"auto_eps": auto_eps, "stable_eps": study["stable_eps"],
           "decades": float(np.log10(eps.max() / eps.min()))}
    if study["exact_unavailable"] is None:
        errors = np.asarray(study["rel_error_exact"])
        if np.isfinite(errors).any():
            best = int(np.nanargmin(errors))
            out.update(reference="exact", min_eps=float(eps[best]), min_rel_error=float(errors[best]))
    else:
        k = int(np.flatnonzero(eps == study["stable_eps"])[0])
        pair = study["rel_error_stable"][k + 1] if k + 1 < len(eps) else float("nan")
        out.update(reference="stable FD pair (estimate)", min_eps=float(study["stable_eps"]),
                   min_rel_error=float(pair))
    if "min_eps" in out:
        out["min_over_auto"] = out["min_eps"] / auto_eps
    return out


def hvp_error(config: RunConfig, *, eps_text: str | None, out_dir: str | None, schemes_text: str | None = None) -> dict:
    from actors.group import rank0
    from actors.records import HVPErrorTask

    from ..run.preflight import preflight
    from ..run.progress import log
    from ..run.ray_connection import one_group, versions

    eps_values = parse_eps(eps_text, config.model.dtype, config.model.compute_dtype)
    schemes = parse_schemes(schemes_text, config.hvp.scheme)
    out_dir = out_dir or RunFolder(config.output_dir).hvp_error_dir
    config = replace(config, output_dir=out_dir, cluster=replace(config.cluster, num_groups=1))
    prepared = preflight(config)

    with one_group(prepared) as (group, setup):
        log(f"model loaded: {setup.num_params:,} parameters; {len(eps_values)} steps from {eps_values[0]:.3g} "
            f"to {eps_values[-1]:.3g} plus the auto eps; schemes {', '.join(schemes)}")
        studies = {}
        for scheme in schemes:  # one after the other: each study holds one HVP per eps while it runs
            task = HVPErrorTask(eps_values=eps_values, seed=config.lanczos.seed, scheme=scheme)
            studies[scheme] = rank0(group.execute(task)).as_dict()  # hessian_core.eps.HVPErrorStudy

    main = schemes[0]
    study = studies[main]
    summaries = {scheme: summarize(s) for scheme, s in studies.items()}
    summary = summaries[main]
    columns = {"eps": study["eps"], "rel_error_exact": study["rel_error_exact"],
               "rel_error_stable": study["rel_error_stable"], "predicted_rel_error": study["predicted"],
               "perturbation_rounding": study["perturbation_rounding"]}
    schema = SCHEMA
    for scheme in schemes[1:]:
        for column, field in SCHEME_COLUMNS:
            columns[f"{scheme}_{column}"] = studies[scheme][field]
            schema = schema.append(pa.field(f"{scheme}_{column}", pa.float64()))
    table = pa.table(columns, schema=schema)
    atomic_write(os.path.join(out_dir, "hvp_error.parquet"), lambda tmp: pq.write_table(table, tmp))
    per_scheme = {scheme: {"summary": summaries[scheme], "auto": s["auto"],
                           "auto_rel_error_exact": s["auto_rel_error_exact"],
                           "auto_rel_error_stable": s["auto_rel_error_stable"]} for scheme, s in studies.items()}
    info = {"status": "complete", "kind": "hvp-error", "config": config.to_dict(), "versions": versions(),
            "num_params": setup.num_params, "scheme": main, "summary": summary,
            "auto": study["auto"], "auto_rel_error_exact": study["auto_rel_error_exact"],
            "auto_rel_error_stable": study["auto_rel_error_stable"], "exact_unavailable": study["exact_unavailable"],
            "schemes": per_scheme}
    write_json(os.path.join(out_dir, "hvp_error.json"), info)
    plot_hvp_error(os.path.join(out_dir, "hvp_error.png"), studies, summaries)
    for scheme in schemes:
        print(f"scheme {scheme}:")
        print(format_hvp_error(studies[scheme], summaries[scheme]))
    print(f"results in {out_dir}")
    return info


RULES = {"central": "Theorem 3.1", "forward": "forward rule"}
COLOURS = ("tab:blue", "tab:orange", "tab:green")


@exclusive
def plot_hvp_error(path: str, studies: dict[str, dict], summaries: dict[str, dict]) -> None:
    """Every scheme's U curve in its own colour: FD against exact (or, without it, against the most stable FD),
    the stable-FD curve of the first scheme, each rule's prediction (dotted) and the error at its auto eps (star
    on a vertical line)."""
    from ..run.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def positive(values):
        a = np.asarray(values, dtype=float)
        return np.where(a > 0, a, np.nan)

    for k, (scheme, study) in enumerate(studies.items()):
        colour, summary, eps = COLOURS[k % len(COLOURS)], summaries[scheme], np.asarray(study["eps"])
        exact = study["exact_unavailable"] is None
        if exact:
            ax.loglog(eps, positive(study["rel_error_exact"]), "o-", ms=4, color=colour,
                      label=f"{scheme}: FD vs exact (double backward)")
        if k == 0 or not exact:
            ax.loglog(eps, positive(study["rel_error_stable"]), "s--", ms=3, alpha=0.6, color=colour,
                      label=f"{scheme}: FD vs most stable FD (eps={study['stable_eps']:.2g})")
        if np.isfinite(study["predicted"]).any():
            ax.loglog(eps, positive(study["predicted"]), ":", color=colour,
                      label=f"{scheme}: {RULES.get(scheme, 'estimate')} estimate")
        ax.axvline(summary["auto_eps"], color=colour, lw=0.8, alpha=0.7)
        auto_error = study["auto_rel_error_exact"] if exact else study["auto_rel_error_stable"]
        if auto_error > 0:
            ax.loglog([summary["auto_eps"]], [auto_error], "*", color=colour, ms=12,
                      label=f"{scheme}: error at auto eps={summary['auto_eps']:.2g}")
    ax.set_xlabel("eps")
    ax.set_ylabel("relative error of H v")
    first = next(iter(studies.values()))
    ax.set_title(f"Finite-difference HVP error against step ({first['auto']['message'].split(':')[0]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def format_hvp_error(study: dict, summary: dict) -> str:
    lines = [f"{'eps':>10}{'vs exact':>12}{'vs stable':>12}{'predicted':>12}{'rounding':>11}"]
    for row in zip(study["eps"], study["rel_error_exact"], study["rel_error_stable"], study["predicted"],
                   study["perturbation_rounding"]):
        lines.append(f"{row[0]:>10.3g}" + "".join(f"{x:>12.3g}" for x in row[1:4]) + f"{row[4]:>11.2g}")
    if "min_eps" in summary:
        lines.append(f"best eps by {summary['reference']}: error {summary['min_rel_error']:.3g} at eps="
                     f"{summary['min_eps']:.3g}; auto eps={summary['auto_eps']:.3g} "
                     f"(ratio {summary['min_over_auto']:.2f}); grid spans {summary['decades']:.1f} decades")
    if study["exact_unavailable"]:
        lines.append(f"no exact reference: {study['exact_unavailable']}")
    return "\n".join(lines)
