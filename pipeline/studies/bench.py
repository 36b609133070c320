"""``hessian-spectrum bench``: the cost of an HVP against a gradient, and end-to-end SLQ against the peers.

In one run: (1) kernel timings and peak memory inside one group of the config's layout (gradient, FD HVP
central and Richardson, exact HVP where it can run, Lanczos vector work per reorthogonalization mode);
(2) end-to-end SLQ wall time, Ray start-up included, for the layouts 1x1, 1x2 and 2x1 (groups x workers);
(3) the same SLQ with hessian-eigenthings (finite-difference and autograd HVPs) in one process, when it is
installed; (4) with ``eigen_k`` > 0, HVPs and wall time to converge the top k eigenpairs to ``eigen.tol``: a run's
eigen task (thick-restart Lanczos, basis k + max(k, 10)) against hessian-eigenthings' ``lanczos`` on its FD
operator at the same eps, whose Lanczos runs a fixed number of steps with no restart: the peer's steps are
doubled from 2k until every pair meets its own criterion (``|beta s_i| < tol |lambda_i|``, per pair, where ours is
``tol |lambda_max|``), and the converging call's HVPs and time are reported, with the steps tried before it apart.
Writes bench.json and bench.parquet to the output folder and prints a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time

import pyarrow as pa

from ..run.config import ConfigError, RunConfig, validate
from ..run.driver import run
from ..run.preflight import model_spec, preflight
from ..run.progress import log
from ..run.ray_connection import one_group
from ..run.run_folder import RunFolder
from ..run.tables import atomic_write, write_json

LAYOUTS = ((1, 1), (1, 2), (2, 1))


def _kernels(prepared, *, eps: float, repeats: int) -> list[dict]:
    config = prepared.config
    from actors.group import rank0
    from actors.records import CalibrationTask, KernelBenchTask

    with one_group(prepared) as (group, _):
        if eps <= 0:
            eps = rank0(group.execute(CalibrationTask(probe=_probe_zero(prepared), fixed_eps=None))).eps
        timings = rank0(group.execute(KernelBenchTask(eps=eps, repeats=repeats, window=config.lanczos.window,
                                                      vector_dtype=config.lanczos.vector_dtype)))
    return [{**t.as_row(), "workers": config.cluster.num_workers, "eps": eps} for t in timings]


def _probe_zero(prepared):
    from actors.records import ProbeTask

    lz = prepared.config.lanczos
    return ProbeTask(probe_id=0, seed=lz.seed, eps=0.0, scheme="central", steps=lz.steps, reorth=lz.reorth,
                     window=lz.window, vector_dtype=lz.vector_dtype, checkpoint_dir=None, checkpoint_every=0)


PHASES = ("startup", "load", "calibration", "probes", "finish")


def settings_label(config: RunConfig) -> str:
    """'defaults', or the hvp/checkpoint settings of this row that differ from the config's defaults."""
    from ..run.config import CheckpointConfig, HVPConfig

    changed = [f"hvp.{k}={getattr(config.hvp, k)}" for k in ("eps", "scheme", "assess")
               if getattr(config.hvp, k) != getattr(HVPConfig(), k)]
    if config.checkpoint.every != CheckpointConfig().every:
        changed.append(f"checkpoint.every={config.checkpoint.every}")
    return ", ".join(changed) or "defaults"


def _slq_row(info: dict, wall: float, *, layout: str, label: str) -> dict:
    """One end-to-end run: wall time, and its fixed cost = wall - (probe HVP steps) x (median step time)."""
    t, lz = info["timing"], info["config"]["lanczos"]
    fixed = isinstance(lz["probes"], int) and isinstance(lz["steps"], int)
    steps = lz["probes"] * lz["steps"] if fixed else info.get("slq_steps", t["hvp_count"])  # auto: as taken
    step = (t["lanczos_step_seconds"] or 0.0) + t["checkpoint_seconds"] / max(steps, 1)
    row = {"tool": "hessian-spectrum", "layout": layout, "settings": label, "seconds": wall,
           "hvps": t["hvp_count"], "lambda_max": info["summary"]["lambda_max"], "step_seconds": step,
           "fixed_seconds": wall - steps * step, "fixed_fraction": (wall - steps * step) / wall}
    row.update({f"{p}_seconds": t.get(f"{p}_seconds") for p in PHASES})
    return row


def _layout_config(config: RunConfig, groups: int, workers: int, *, out_dir: str) -> RunConfig:
    return dataclasses.replace(
        config, output_dir=os.path.join(out_dir, f"slq-{groups}x{workers}"),
        cluster=dataclasses.replace(config.cluster, num_groups=groups, num_workers=workers),
        blocks=dataclasses.replace(config.blocks, enabled=False))


def check_layouts(config: RunConfig, layouts) -> None:
    """Refuse, before anything runs, a layout the config cannot be placed on (e.g. workers that do not divide
    data.batch_size), naming it and the worker counts that fit."""
    for groups, workers in layouts:
        try:
            validate(_layout_config(config, groups, workers, out_dir=""))
        except ConfigError as e:
            size = config.data.batch_size
            fits = ", ".join(str(w) for w in range(1, size + 1) if size % w == 0)
            raise ConfigError(f"--layouts {groups}x{workers} cannot be placed: {e} (workers per group that "
                              f"divide data.batch_size={size}: {fits})") from None


def _end_to_end(config: RunConfig, *, out_dir: str, layouts, runs: int) -> list[dict]:
    """The config as the user runs it (its eps and checkpoint settings), per layout, ``runs`` times."""
    rows = []
    for groups, workers in layouts:
        cfg = _layout_config(config, groups, workers, out_dir=out_dir)
        for _ in range(runs):
            started = time.perf_counter()
            info = run(preflight(cfg, fresh=True))
            rows.append(_slq_row(info, time.perf_counter() - started, layout=f"{groups}x{workers}",
                                 label=settings_label(cfg)))
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per (tool, layout, settings): the median of every number over its repetitions."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tool"], r["layout"], r.get("settings", "")), []).append(r)
    out = []
    for (tool, layout, label), rs in groups.items():
        row = {"tool": tool, "layout": layout, "settings": label, "runs": len(rs)}
        for key in rs[0]:
            values = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
            if key not in row and len(values) == len(rs):
                row[key] = statistics.median(values)
        out.append(row)
    return out


def _eigenthings(prepared, *, eps: float, runs: int, methods=("finite_difference", "autograd")) -> list[dict]:
    try:
        import hessian_eigenthings as he
    except ImportError:
        log("hessian-eigenthings is not installed (pip install hessian-eigenthings): no peer comparison")
        return []
    import torch

    from hessian_core import causal_lm_loss
    from hessian_core.loss import rank_batches
    from hessian_core.models import load_model

    config = prepared.config
    rows = []
    for method in [m for m in methods for _ in range(runs)]:
        started = time.perf_counter()
        model = load_model(model_spec(prepared))
        batches = rank_batches(prepared.batches, 0, 1)  # input_ids tensors, or dicts with masks
        op = he.HessianOperator(model, batches, lambda m, b: causal_lm_loss(m, b), method=method,
                                fd_eps=eps if method == "finite_difference" else None)
        # double backward needs the math kernel; the FD peer gets the default kernels, as our runs do
        kernel = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if method == "autograd"
                  else contextlib.nullcontext())
        with kernel:
            result = he.spectral_density(op, num_runs=config.lanczos.probe_budget,
                                         lanczos_steps=config.lanczos.step_budget, seed=0)
        wall = time.perf_counter() - started
        top = float(result.raw_eigenvalues.max())
        rows.append({"tool": f"hessian-eigenthings ({method})", "layout": "1 process", "settings": f"eps={eps:.3g}",
                     "seconds": wall,
                     "hvps": config.lanczos.probe_budget * config.lanczos.step_budget, "lambda_max": top})
    return rows


def _eigen_rows(config: RunConfig, *, out_dir: str, k: int, peer: bool) -> list[dict]:
    """Top-k eigenpairs to config.eigen.tol: one run with the eigen task (1 group, the config's workers, one
    short SLQ probe beside it), then hessian-eigenthings' Lanczos at the run's eps on the same model and data."""
    cfg = dataclasses.replace(
        _layout_config(config, 1, config.cluster.num_workers, out_dir=out_dir),
        output_dir=os.path.join(out_dir, "eigen"), eigen=dataclasses.replace(config.eigen, k=k),
        lanczos=dataclasses.replace(config.lanczos, probes=1, steps=min(config.lanczos.step_budget, 10)))
    validate(cfg)
    started = time.perf_counter()
    prepared = preflight(cfg, fresh=True)
    info = run(prepared)
    wall = time.perf_counter() - started
    eigen = info["eigen"]
    rows = [{"tool": "hessian-spectrum", "method": "thick-restart Lanczos", "k": k, "tol": cfg.eigen.tol,
             "hvps": eigen["hvps"], "seconds": eigen["solver_seconds"], "task_seconds": eigen["seconds"],
             "run_seconds": wall, "steps_tried_before": 0,
             "converged": eigen["converged"], "eigenvalues": list(eigen["eigenvalues"]), "eps": info["eps"]}]
    if peer:
        rows += _eigenthings_topk(prepared, eps=info["eps"], k=k, tol=cfg.eigen.tol, which=cfg.eigen.which,
                                  ceiling=cfg.eigen.max_hvps)
    return rows


def _eigenthings_topk(prepared, *, eps: float, k: int, tol: float, which: str, ceiling: int) -> list[dict]:
    try:
        import hessian_eigenthings as he
    except ImportError:
        log("hessian-eigenthings is not installed (pip install hessian-eigenthings): no peer comparison")
        return []
    from hessian_core import causal_lm_loss
    from hessian_core.loss import rank_batches
    from hessian_core.models import load_model

    model = load_model(model_spec(prepared))
    batches = rank_batches(prepared.batches, 0, 1)
    op = he.HessianOperator(model, batches, lambda m, b: causal_lm_loss(m, b), method="finite_difference",
                            fd_eps=eps)
    steps, tried = 2 * k, 0
    while True:
        started = time.perf_counter()
        result = he.lanczos(op, k=k, max_iter=steps, tol=tol, which=which, seed=0)
        seconds = time.perf_counter() - started
        done = bool(result.converged.all())
        if done or steps >= ceiling:
            return [{"tool": "hessian-eigenthings", "method": "Lanczos, no restart (lanczos)", "k": k, "tol": tol,
                     "hvps": steps, "seconds": seconds, "run_seconds": seconds, "steps_tried_before": tried,
                     "converged": int(result.converged.sum()),
                     "eigenvalues": [float(v) for v in result.eigenvalues], "eps": eps}]
        tried += steps
        steps *= 2


def bench(config: RunConfig, *, repeats: int = 5, out_dir: str | None = None, runs: int = 1,
          layouts=LAYOUTS, kernels: bool = True, peers=("finite_difference", "autograd"),
          variants: tuple[RunConfig, ...] = (), eigen_k: int = 0) -> dict:
    """Kernels, end-to-end SLQ per layout (and per variant config on the first layout), and the peers, in one
    process so that every ratio shares one machine state."""
    for cfg, its_layouts in ((config, layouts), *((variant, layouts[:1]) for variant in variants)):
        check_layouts(cfg, its_layouts)
    out_dir = out_dir or os.path.join(config.output_dir, "bench")
    os.makedirs(out_dir, exist_ok=True)
    prepared = preflight(dataclasses.replace(config, output_dir=os.path.join(out_dir, "probe-check")), fresh=True)
    eps = float(config.hvp.eps) if config.hvp.eps != "auto" else 0.0
    kernel_rows = []
    if kernels:
        log(f"kernels on 1 group x {config.cluster.num_workers} worker(s), {repeats} repeats")
        kernel_rows = _kernels(prepared, eps=eps, repeats=repeats)
    log(f"end-to-end SLQ ({settings_label(config)}): {config.lanczos.probes} probes x {config.lanczos.steps} steps, "
        f"{runs} run(s) per layout")
    runs_e2e = _end_to_end(config, out_dir=out_dir, layouts=layouts, runs=runs)
    for k, variant in enumerate(variants):
        log(f"variant: {settings_label(variant)}")
        runs_e2e += _end_to_end(variant, out_dir=os.path.join(out_dir, f"variant-{k}"), layouts=layouts[:1],
                                runs=runs)
    if runs_e2e:
        eps = RunFolder(os.path.join(out_dir, f"slq-{layouts[0][0]}x{layouts[0][1]}")).info().eps
    elif kernel_rows:
        eps = kernel_rows[0]["eps"]
    runs_e2e += _eigenthings(prepared, eps=eps, runs=runs, methods=peers) if peers else []
    slq = medians(runs_e2e)
    base = next((r for r in slq if r["layout"] == "1x1"), None)
    for r in slq:
        r["throughput_vs_1x1"] = base["seconds"] / r["seconds"] if base else float("nan")
        r["seconds_vs_1x1"] = r["seconds"] / base["seconds"] if base else float("nan")
    import ray
    import torch
    import transformers

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "ray": ray.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config.to_dict(), "kernels": kernel_rows,
              "slq": slq, "slq_runs": runs_e2e, "eigen": []}
    if eigen_k:
        log(f"top {eigen_k} eigenpairs to eigen.tol={config.eigen.tol:g}")
        result["eigen"] = _eigen_rows(config, out_dir=out_dir, k=eigen_k, peer=bool(peers))
    write_json(os.path.join(out_dir, "bench.json"), result)
    import pyarrow.parquet as pq

    if kernel_rows:
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "note"} for r in kernel_rows])
        atomic_write(os.path.join(out_dir, "bench.parquet"), lambda tmp: pq.write_table(table, tmp))
    print(format_bench(result))
    return result


def format_bench(result: dict) -> str:
    lines = []
    if result["kernels"]:
        lines.append(f"{'kernel':<26}{'seconds':>10}{'x gradient':>12}{'peak MiB':>10}{'peak - grad MiB':>17}")
        for r in result["kernels"]:
            lines.append(f"{r['kernel']:<26}{r['seconds']:>10.4f}{r['ratio_to_gradient']:>12.2f}"
                         f"{r['peak_mib']:>10.1f}{r['peak_over_gradient_mib']:>17.1f}")
        lines.append("")
    lines.append(f"{'end-to-end SLQ (median of runs)':<40}{'layout':>10}{'seconds':>10}{'HVPs':>7}{'vs 1x1':>8}"
                 f"{'fixed %':>9}{'lambda_max':>12}  settings")
    for r in result["slq"]:
        fixed = f"{100 * r['fixed_fraction']:>9.1f}" if "fixed_fraction" in r else f"{'-':>9}"
        lines.append(f"{r['tool']:<40}{r['layout']:>10}{r['seconds']:>10.2f}{r['hvps']:>7.0f}"
                     f"{r['seconds_vs_1x1']:>8.2f}{fixed}{r['lambda_max']:>12.5g}  {r['settings']}")
    if result.get("eigen"):
        lines.append("")
        lines.append(f"{'top-k eigenpairs':<22}{'method':<32}{'k':>3}{'tol':>9}{'HVPs':>7}{'seconds':>10}"
                     f"{'converged':>11}{'lambda_1':>12}")
        for r in result["eigen"]:
            lines.append(f"{r['tool']:<22}{r['method']:<32}{r['k']:>3}{r['tol']:>9.0e}{r['hvps']:>7}"
                         f"{r['seconds']:>10.2f}{r['converged']:>11}{max(r['eigenvalues']):>12.6g}")
    phased = [r for r in result["slq"] if "fixed_seconds" in r]
    if phased:
        lines.append("")
        lines.append(f"{'fixed cost by phase (s)':<24}" + "".join(f"{p:>12}" for p in PHASES) + f"{'fixed':>10}")
        for r in phased:
            lines.append(f"{r['layout']:<24}" + "".join(f"{(r.get(p + '_seconds') or 0):>12.2f}" for p in PHASES)
                         + f"{r['fixed_seconds']:>10.2f}")
    return "\n".join(lines)


__all__ = ["bench", "format_bench"]
