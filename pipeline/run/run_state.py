"""What a run folder holds and what became of its run, read-only, for show, report, plot and compare: complete,
running (its lock is alive), killed (run.json says running but no live process holds the lock), interrupted
(with the signal) or failed, and how many probes are finished or checkpointed."""

from __future__ import annotations

import re

from .output_lock import OutputLock, describe
from .run_folder import RunFolder, RunInfo


def status(run_dir: str, info: RunInfo) -> str:
    """``info.status``, with a ``running`` whose holder is gone told as ``killed``."""
    state = info.status
    if state == "running":
        lock = OutputLock(run_dir)
        holder = lock.read()
        if holder is None or lock.stale(holder):
            return "killed"
    return str(state)


def holdings(run_dir: str, info: RunInfo) -> str:
    """e.g. "1 of 4 probes finished, probe 1 checkpointed at step 12"."""
    folder = RunFolder(run_dir)
    probes = info.probes
    done = folder.finished_probe_ids() if probes else set()
    parts = [f"{len(done)} of {probes} probes finished"] if probes else []
    for pid, step in folder.checkpoint_steps(pid for pid in range(probes) if pid not in done).items():
        parts.append(f"probe {pid} checkpointed at step {step}")
    if info.block_probes is not None:
        parts.append(f"{len(folder.finished_block_probe_ids())} of {info.block_probes} block probes finished")
    blocks = info.config.get("blocks") or {}
    if blocks.get("approximations"):
        parts.append(f"{len(folder.approximation_probes())} of {blocks.get('probes')} approximation probes finished")
    return ", ".join(parts)


def describe_run(run_dir: str, info: RunInfo) -> str:
    """One line: what became of the run and, unless complete, what it holds and what to do."""
    state = status(run_dir, info)
    if state == "complete":
        return "status: complete"
    what = holdings(run_dir, info)
    if state == "running":
        return f"status: running, held by {describe(OutputLock(run_dir).read() or {})}; so far {what}"
    if state == "killed":
        return (f"status: killed (run.json says running, but no live process holds {run_dir}); it holds {what}; "
                f"run the same command again to resume")
    if state == "interrupted":
        return (f"status: interrupted by {info.signal or 'a signal'}; it holds {what}; run the same command "
                f"again to resume")
    return f"status: {state}" + (f" ({info.error})" if info.error else "") + (f"; it holds {what}" if what else "")


def block_order(blocks: dict) -> list[str]:
    """The blocks in model order: as recorded (``order``), else numbers compared as numbers (layers.2 before
    layers.10) for a run.json written before the order was kept."""
    if blocks.get("order"):
        return list(blocks["order"])
    return sorted(blocks["per_block"], key=lambda name: [int(t) if t.isdigit() else t
                                                           for t in re.split(r"(\d+)", name)])
