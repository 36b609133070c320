"""The ``hessian-spectrum`` command: run, sweep, hvp-error, bench, plan, compare, report, plot, show, config-table.

Exit status 0 success, 2 invalid input (before anything expensive starts), 1 other failure, 128 + the signal's
number when stopped by SIGINT (130) or SIGTERM (143)."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import TYPE_CHECKING

from .run import signals
from .run.config import ConfigError, load_config, reference_table
from .run.signals import as_interrupted
from .report.summary import format_summary

if TYPE_CHECKING:
    from .run.run_folder import RunInfo

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit status is 2 as well; keep it to one line
        self.print_usage(sys.stderr)
        print(f"hessian-spectrum: error: {message}", file=sys.stderr)
        sys.exit(EXIT_INVALID)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hessian-spectrum", description="Hessian spectra of transformer LMs with FD HVPs on FSDP2 + Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run what the config enables (SLQ density, block analysis)")
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lanczos.steps=40 (repeatable)")
    r.add_argument("--fresh", action="store_true", help="replace an existing run in output_dir with another config")
    b = sub.add_parser("bench", help="HVP cost against a gradient and end-to-end SLQ against hessian-eigenthings")
    b.add_argument("config")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--repeats", type=int, default=5, help="timed repetitions per kernel after one warm-up")
    b.add_argument("--output", default=None, help="folder for bench.json / bench.parquet (default: output_dir/bench)")
    b.add_argument("--runs", type=int, default=3, help="end-to-end repetitions per layout and peer (medians reported)")
    b.add_argument("--layouts", default="1x1,1x2,2x1", help="end-to-end layouts GROUPSxWORKERS, comma-separated")
    b.add_argument("--no-kernels", action="store_true", help="skip the kernel timings")
    b.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                   help="also run the first layout with this override, e.g. checkpoint.every=1 (repeatable)")
    b.add_argument("--peers", default="finite_difference,autograd",
                   help="hessian-eigenthings HVP methods to compare against ('' for none)")
    b.add_argument("--eigen", type=int, default=0, metavar="K",
                   help="also time the top K eigenpairs to eigen.tol, ours against hessian-eigenthings' Lanczos")
    b.add_argument("--targets", action="store_true",
                   help="instead: HVPs and wall time to fixed targets (lambda_max, trace stderr, density) for the "
                        "defaults, the auto settings (central and forward HVPs) and hessian-eigenthings")
    sw = sub.add_parser("sweep", help="runs over the Cartesian product of --grid overrides, in parallel, resumable")
    sw.add_argument("config")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a config key and its values, e.g. --grid hvp.eps=auto,1e-4 (repeatable: the product)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every point (repeatable)")
    sw.add_argument("--parallel", type=int, default=None,
                    help="points run at once, one group each (default: cluster.num_groups)")
    sw.add_argument("--reference", default=None, help="point compared against (default: the first)")
    sw.add_argument("--fresh", action="store_true", help="discard earlier results in output_dir")
    he = sub.add_parser("hvp-error", help="FD HVP error against eps: exact and stable references, Theorem 3.1")
    he.add_argument("config")
    he.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    he.add_argument("--eps", default=None, metavar="E1,E2,...",
                    help="steps to try (default: 6 decades, 3 per decade, around the dtype's default step)")
    he.add_argument("--output", default=None, help="folder for the results (default: output_dir/hvp-error)")
    he.add_argument("--schemes", default=None, metavar="S1,S2",
                    help="difference schemes, one U curve each (default: hvp.scheme, then central and forward)")
    c = sub.add_parser("compare", help="statistics of runs (or a sweep's points) and their spectral distance")
    c.add_argument("run_dirs", nargs="+", help="run folders, or a sweep folder for all its finished points")
    c.add_argument("--output", default="compare", help="folder for compare.parquet and compare.png")
    c.add_argument("--reference", default=None, help="run (path or folder name) to measure distances to "
                                                     "(default: the first)")
    c.add_argument("--include-partial", action="store_true",
                   help="also compare runs that are not complete (interrupted, killed, failed) on what they hold")
    rp = sub.add_parser("report", help="one self-contained report.html for a run, sweep, comparison or hvp-error")
    rp.add_argument("folder")
    rp.add_argument("--output", default=None, help="file to write (default: FOLDER/report.html)")
    pl = sub.add_parser("plot", help="redraw the plots of a run from its tables, or draw a time-series Parquet "
                                     "(column step) or a compare.parquet over checkpoints")
    pl.add_argument("run_dir", help="a run folder, or a .parquet time series / compare.parquet")
    pl.add_argument("--output", default=None, help="PNG for a .parquet (default: beside it, same name)")
    pn = sub.add_parser("plan", help="per-rank memory, HVP count and wall time of a config, without Ray or weights")
    pn.add_argument("config")
    pn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pn.add_argument("--device-memory", default=None, metavar="SIZE",
                    help="memory per rank to check against, e.g. 80GiB (default: this GPU's, or host RAM / ranks)")
    pn.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                    help="an earlier run whose timing.grad_seconds predicts the wall time")
    pn.add_argument("--host-memory", default=None, metavar="SIZE",
                    help="host memory per node to check against, e.g. 1TiB")
    pn.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                    help="ranks (GPUs) per node for the host-memory line (default: 8 with use_gpu, else this machine's ranks)")
    s = sub.add_parser("show", help="print a run's summary")
    s.add_argument("run_dir")
    sub.add_parser("config-table", help="print docs/config.md's configuration table from the config's declarations")
    return p


def _layouts(text: str) -> tuple[tuple[int, int], ...]:
    layouts = []
    for part in text.split(","):
        groups, _, workers = part.strip().partition("x")
        if not (groups.isdigit() and workers.isdigit() and int(groups) >= 1 and int(workers) >= 1):
            raise ConfigError(f"--layouts: {part.strip()!r} is not GROUPSxWORKERS, e.g. --layouts 1x1,2x1")
        layouts.append((int(groups), int(workers)))
    return tuple(layouts)


def _read_run(run_dir: str) -> RunInfo:
    from .run.run_folder import RunFolder

    return RunFolder(run_dir).info()


def _run(args) -> None:
    from .run.output_lock import OutputLock

    config = load_config(args.config, args.overrides)
    with OutputLock(config.output_dir):  # before the heavy imports: a second run is refused at once
        from .run.driver import preflight, run
        from .run.preflight import finished_run

        info = None if args.fresh else finished_run(config)
        if info is not None:
            print(format_summary(info))
            print(f"{config.output_dir} already holds this run, complete; --fresh recomputes it")
            return
        info = run(preflight(config, fresh=args.fresh))
    print(format_summary(info))
    print(f"results in {config.output_dir}")


def _bench(args) -> None:
    from .studies.bench import bench

    if args.repeats < 1 or args.runs < 1:
        raise ConfigError(f"--repeats and --runs must be >= 1, got {args.repeats} and {args.runs}")
    if args.eigen < 0:
        raise ConfigError(f"--eigen must be >= 0 (0: no eigenpair benchmark), got {args.eigen}")
    if args.targets:
        import os

        from .run.tables import write_json
        from .studies.targets import format_targets, targets_study

        config = load_config(args.config, args.overrides)
        out_dir = args.output or os.path.join(config.output_dir, "bench-targets")
        result = targets_study(config, out_dir=out_dir, peer=bool(args.peers))
        write_json(os.path.join(out_dir, "bench.json"), result)
        print(format_targets(result))
        return
    variants = tuple(load_config(args.config, args.overrides + [v]) for v in args.variant)
    bench(load_config(args.config, args.overrides), repeats=args.repeats, out_dir=args.output, runs=args.runs,
          layouts=_layouts(args.layouts), kernels=not args.no_kernels,
          peers=tuple(p for p in args.peers.split(",") if p), variants=variants, eigen_k=args.eigen)


def _sweep(args) -> None:
    from .studies.sweep import sweep

    sweep(args.config, args.overrides, args.grid, parallel=args.parallel, fresh=args.fresh, reference=args.reference)


def _hvp_error(args) -> None:
    from .studies.hvp_error import hvp_error

    hvp_error(load_config(args.config, args.overrides), eps_text=args.eps, out_dir=args.output,
              schemes_text=args.schemes)


def _compare(args) -> None:
    from .studies.compare import compare

    compare(args.run_dirs, out_dir=args.output, reference=args.reference, include_partial=args.include_partial)


def _report(args) -> None:
    from .report.report import write_report

    print(f"wrote {write_report(args.folder, output=args.output)}")


def _plot(args) -> None:
    if args.run_dir.endswith(".parquet"):  # a training run's time series
        from .studies.timeseries import plot_timeseries

        if not os.path.isfile(args.run_dir):
            raise ConfigError(f"{args.run_dir!r} does not exist")
        print(f"wrote {plot_timeseries(args.run_dir, output=args.output)}")
        return
    from .run.driver import draw_plots

    _read_run(args.run_dir)
    written = draw_plots(args.run_dir)
    print("wrote " + (", ".join(written) if written else "nothing (no tables yet)"))


def _plan(args) -> None:
    from .run.plan import plan_command

    print(plan_command(load_config(args.config, args.overrides, this_machine=False), device_memory=args.device_memory,
                       from_run=args.from_run, host_memory=args.host_memory, ranks_per_node=args.ranks_per_node))


COMMANDS = {"run": _run, "bench": _bench, "sweep": _sweep, "hvp-error": _hvp_error, "compare": _compare,
            "report": _report, "plot": _plot, "plan": _plan,
            "show": lambda args: print(format_summary(_read_run(args.run_dir), args.run_dir)),
            "config-table": lambda args: print(reference_table())}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signals.install()
    try:
        COMMANDS[args.command](args)
        return EXIT_OK
    except ConfigError as e:
        print(f"hessian-spectrum: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt as e:
        stop = as_interrupted(e)
        print(f"hessian-spectrum: interrupted by {stop.signal_name}; finished results and checkpoints are kept: run "
              f"the same command again to resume", file=sys.stderr)
        return stop.exit_code
    except Exception as e:  # noqa: BLE001 - the top level reports any failure in one line plus its type
        if os.environ.get("HESSIAN_SPECTRUM_DEBUG"):
            raise
        print(f"hessian-spectrum: failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
              "\n(set HESSIAN_SPECTRUM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """The console script: ``main``, then a quick exit. By now every output file is closed; what is left is
    the interpreter tearing down torch, transformers and Ray's client, 1-2 s on every command that nobody
    waits for on purpose. So the remaining threads are joined, the atexit handlers run (Ray's shutdown,
    logging's flush) and the process ends without the teardown."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
