"""``hessian-spectrum bench CONFIG --targets``: HVPs and wall time to fixed accuracy targets, per set-up, in one run.

The targets (``TARGETS``), each against references computed here at the same eps:
- lambda_max within 1e-3 relative of a long reference (8 probes x 160 Lanczos steps, full reorthogonalization:
  the largest Ritz value);
- the trace's standard error <= 2% of |trace| (the set-up's own estimator: its trace task where it has one, else
  Hutchinson over its SLQ probes);
- the density within 0.005 W1 / width of that reference's (the raw SLQ measures: a shared smoothing kernel can
  only bring them closer).

The set-ups:
- ``defaults``: the config as a user runs it (its probes, steps and eps), the block analysis off;
- ``auto``: ``lanczos.steps: auto``, ``lanczos.probes: auto``, ``trace.estimator: deflated``, at the defaults' eps;
- ``auto, forward``: the same with ``hvp.scheme: forward`` at its own auto eps (one gradient pass an HVP);
- hessian-eigenthings at the same eps: its ``spectral_density`` and its ``trace`` (Hutch++), each doubled from a
  small start (runs and steps for the first two targets, matvecs for the trace) until it meets its targets; the
  meeting calls' HVPs and time are its row, the calls before them are reported apart (a user who knew the
  settings in advance would pay only the row).
Our rows are end-to-end CLI runs (Ray start, group formation and model load included); the peer's are one process
(model load included). Everything runs on this machine in one process, so ratios share one machine state.
"""

from __future__ import annotations

import dataclasses
import os
import time

from hessian_core import SpectralMeasure
from hessian_core.convergence import relative_w1

from ..run.config import RunConfig
from ..run.driver import run
from ..run.preflight import model_spec, preflight
from ..run.progress import log
from ..run.run_folder import RunFolder


@dataclasses.dataclass(frozen=True, kw_only=True)
class Targets:
    lambda_max_rtol: float = 1e-3
    trace_rtol: float = 0.02
    density_w1: float = 0.005


TARGETS = Targets()
REFERENCE_PROBES, REFERENCE_STEPS = 8, 160
PEER_START = {"runs": 2, "steps": 10, "matvecs": 30}
PEER_DOUBLINGS = 6


def _with(config: RunConfig, out_dir: str, name: str, **sections) -> RunConfig:
    changed = {k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()}
    blocks = dataclasses.replace(config.blocks, enabled=False, spectra=False, approximations=[])
    return dataclasses.replace(config, output_dir=os.path.join(out_dir, name), blocks=blocks,
                               eigen=dataclasses.replace(config.eigen, k=0), **changed)


def _measure(run_dir: str) -> SpectralMeasure:
    return SpectralMeasure.from_rules(RunFolder(run_dir).ritz_rules())


def _ours(name: str, config: RunConfig, *, reference: SpectralMeasure, lambda_ref: float) -> dict:
    started = time.perf_counter()
    info = run(preflight(config, fresh=True))
    return _ours_from(info, config, name=name, wall=time.perf_counter() - started, reference=reference,
                      lambda_ref=lambda_ref)


def _row(name: str, *, tool: str, seconds: float, hvps: int, lambda_max: float, lambda_ref: float, trace: float,
         trace_stderr: float | None, density_w1: float, **extra) -> dict:
    rel = abs(lambda_max - lambda_ref) / abs(lambda_ref)
    trace_rel = (trace_stderr / abs(trace)) if trace_stderr is not None and trace else float("inf")
    met = {"lambda_max": rel <= TARGETS.lambda_max_rtol, "trace": trace_rel <= TARGETS.trace_rtol,
           "density": density_w1 <= TARGETS.density_w1}
    return {"setup": name, "tool": tool, "seconds": seconds, "hvps": hvps, "lambda_max": lambda_max,
            "lambda_max_rel_error": rel, "trace": trace, "trace_rel_stderr": trace_rel, "density_w1": density_w1,
            "met": met, "all_met": all(met.values()), **extra}


def _peer(prepared, *, eps: float, reference: SpectralMeasure, lambda_ref: float) -> dict | None:
    """hessian-eigenthings' spectral_density and trace (Hutch++), each doubled until it meets its targets."""
    try:
        import hessian_eigenthings as he
    except ImportError:
        log("hessian-eigenthings is not installed: no peer row")
        return None
    from hessian_core import causal_lm_loss
    from hessian_core.loss import rank_batches
    from hessian_core.models import load_model

    started = time.perf_counter()
    model = load_model(model_spec(prepared))
    batches = rank_batches(prepared.batches, 0, 1)
    op = he.HessianOperator(model, batches, lambda m, b: causal_lm_loss(m, b), method="finite_difference",
                            fd_eps=eps)
    load = time.perf_counter() - started
    runs, steps = PEER_START["runs"], PEER_START["steps"]
    tried = {"hvps": 0, "seconds": 0.0}
    for _ in range(PEER_DOUBLINGS):
        t0 = time.perf_counter()
        result = he.spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=0)
        seconds = time.perf_counter() - t0
        values = result.raw_eigenvalues.double().numpy()
        weights = result.raw_weights.double().numpy()
        measure = SpectralMeasure.from_rules([ritz_rule_of(v, w) for v, w in zip(values, weights)])
        top = float(values.max())
        rel, w1 = abs(top - lambda_ref) / abs(lambda_ref), relative_w1(measure, reference)
        if rel <= TARGETS.lambda_max_rtol and w1 <= TARGETS.density_w1:
            break
        tried["hvps"] += runs * steps
        tried["seconds"] += seconds
        steps = steps * 2 if rel > TARGETS.lambda_max_rtol else steps
        runs = runs * 2 if w1 > TARGETS.density_w1 else runs
    density_hvps, density_seconds = runs * steps, seconds
    matvecs = PEER_START["matvecs"]
    for _ in range(PEER_DOUBLINGS):
        t0 = time.perf_counter()
        trace = he.trace(op, num_matvecs=matvecs, method="hutch++", seed=0)
        trace_seconds = time.perf_counter() - t0
        if trace.stderr <= TARGETS.trace_rtol * abs(trace.estimate):
            break
        tried["hvps"] += matvecs
        tried["seconds"] += trace_seconds
        matvecs *= 2
    row = _row("hessian-eigenthings (spectral_density + trace, hutch++)", tool="hessian-eigenthings",
               seconds=load + density_seconds + trace_seconds, hvps=density_hvps + matvecs, lambda_max=top,
               lambda_ref=lambda_ref, trace=trace.estimate, trace_stderr=trace.stderr, density_w1=w1, eps=eps,
               probes=runs, steps=runs * steps)
    row.update(peer_settings={"num_runs": runs, "lanczos_steps": steps, "num_matvecs": matvecs},
               tried_hvps=tried["hvps"], tried_seconds=tried["seconds"], load_seconds=load)
    return row


def ritz_rule_of(values, weights):
    """A Ritz rule (residuals unknown: zero) from a peer's per-run eigenvalues and weights."""
    import numpy as np

    from hessian_core.quadrature import RitzRule

    order = np.argsort(values)
    w = np.asarray(weights, dtype=np.float64)[order]
    return RitzRule(np.asarray(values, dtype=np.float64)[order], w / w.sum(), np.zeros(len(values)))


def targets_study(config: RunConfig, *, out_dir: str, peer: bool = True, forward: bool = True) -> dict:
    """The rows of every set-up against the targets; the defaults' run first (its eps is everyone's)."""
    os.makedirs(out_dir, exist_ok=True)
    defaults = _with(config, out_dir, "defaults")
    log(f"targets: the defaults ({config.lanczos.probes} probes x {config.lanczos.steps} steps)")
    started = time.perf_counter()
    info = run(preflight(defaults, fresh=True))
    defaults_wall = time.perf_counter() - started
    eps = info["eps"]
    fixed = {"eps": eps, "assess": False}
    log(f"targets: the reference ({REFERENCE_PROBES} probes x {REFERENCE_STEPS} steps, full reorthogonalization, "
        f"eps={eps:.3g})")
    reference_cfg = _with(config, out_dir, "reference", hvp=fixed,
                          lanczos={"probes": REFERENCE_PROBES, "steps": REFERENCE_STEPS, "reorth": "full"})
    run(preflight(reference_cfg, fresh=True))
    reference = _measure(reference_cfg.output_dir)
    lambda_ref = float(reference.values[-1])
    rows = [_ours_from(info, defaults, name="defaults", wall=defaults_wall, reference=reference,
                       lambda_ref=lambda_ref)]
    auto = {"lanczos": {"steps": "auto", "probes": "auto"},
            "trace": {"estimator": "deflated", "rtol": TARGETS.trace_rtol},
            "density": {"tol": TARGETS.density_w1}}
    log("targets: auto (central)")
    rows.append(_ours("auto (central)", _with(config, out_dir, "auto-central", hvp=fixed, **auto),
                      reference=reference, lambda_ref=lambda_ref))
    if forward:
        log("targets: auto (forward, its own auto eps)")
        rows.append(_ours("auto (forward)", _with(config, out_dir, "auto-forward",
                                                  hvp={"scheme": "forward", "eps": "auto", "assess": True}, **auto),
                          reference=reference, lambda_ref=lambda_ref))
    if peer:
        log("targets: hessian-eigenthings")
        # its own folder: a fresh preflight clears its output_dir, which must not be the defaults' run
        peer_cfg = dataclasses.replace(defaults, output_dir=os.path.join(out_dir, "peer-inputs"))
        peer_row = _peer(preflight(peer_cfg, fresh=True), eps=eps, reference=reference, lambda_ref=lambda_ref)
        if peer_row is not None:
            rows.append(peer_row)
            for r in rows[:-1]:
                r["seconds_vs_peer"] = r["seconds"] / peer_row["seconds"]
                r["hvps_vs_peer"] = r["hvps"] / peer_row["hvps"]
    return {"targets": dataclasses.asdict(TARGETS), "reference": {"probes": REFERENCE_PROBES,
                                                                   "steps": REFERENCE_STEPS,
                                                                   "lambda_max": lambda_ref, "eps": eps},
            "rows": rows}


def _ours_from(info: dict, config: RunConfig, *, name: str, wall: float, reference: SpectralMeasure,
               lambda_ref: float) -> dict:
    """A finished run's row: its trace task's estimate where it has one, else the SLQ probes' own."""
    s, trace = info["summary"], info.get("trace")
    trace_value, trace_stderr = (trace["trace"], trace["stderr"]) if trace else (s["trace"], s["trace_stderr"])
    rules = RunFolder(config.output_dir).ritz_rules()
    return _row(name, tool="hessian-spectrum", seconds=wall, hvps=info["timing"]["hvp_count"],
                lambda_max=s["lambda_max"], lambda_ref=lambda_ref, trace=trace_value, trace_stderr=trace_stderr,
                density_w1=relative_w1(SpectralMeasure.from_rules(rules), reference), eps=info["eps"],
                probes=s["probes"], steps=int(sum(len(r.values) for r in rules)))


def format_targets(result: dict) -> str:
    t = result["targets"]
    lines = [f"targets: lambda_max within {t['lambda_max_rtol']:g} of the reference "
             f"({result['reference']['lambda_max']:.6g}), trace stderr <= {t['trace_rtol']:.0%}, density W1/width <= "
             f"{t['density_w1']:g}",
             f"{'set-up':<58}{'seconds':>9}{'HVPs':>7}{'lmax err':>10}{'trace se':>10}{'W1/width':>10}  met"]
    for r in result["rows"]:
        met = ",".join(k for k, ok in r["met"].items() if ok) or "-"
        lines.append(f"{r['setup']:<58}{r['seconds']:>9.2f}{r['hvps']:>7}{r['lambda_max_rel_error']:>10.2e}"
                     f"{r['trace_rel_stderr']:>10.2%}{r['density_w1']:>10.2e}  {met}")
    peer = next((r for r in result["rows"] if r["tool"] == "hessian-eigenthings"), None)
    if peer:
        lines.append(f"peer settings that met its targets: {peer['peer_settings']} (before them: "
                     f"{peer['tried_hvps']} HVPs, {peer['tried_seconds']:.1f} s)")
        for r in result["rows"]:
            if "seconds_vs_peer" in r:
                lines.append(f"  {r['setup']}: {r['seconds_vs_peer']:.2f}x the peer's wall time, "
                             f"{r['hvps_vs_peer']:.2f}x its HVPs")
    return "\n".join(lines)
