"""Figures drawn from the result tables with matplotlib's Agg backend: density.png and blocks.png."""

from __future__ import annotations

import functools
import threading

import numpy as np

from .tables import atomic_write


# pyplot's figure manager and mathtext parser are not thread-safe, and a sweep finishes runs in threads
PLOT_LOCK = threading.RLock()


def exclusive(draw):
    """Run a drawing function under PLOT_LOCK."""

    @functools.wraps(draw)
    def locked(*args, **kwargs):
        with PLOT_LOCK:
            return draw(*args, **kwargs)

    return locked


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@exclusive
def plot_density(path: str, *, grid: np.ndarray, density: np.ndarray, ritz_values: np.ndarray, title: str,
                 blocks: dict[str, np.ndarray] | None = None) -> None:
    """Linear and log density panels, with the Ritz values as a rug; ``blocks`` (block -> its density on
    ``grid`` scaled by its share of the parameters) overlays the diagonal blocks' spectra and their sum, the
    spectrum of the block-diagonal approximation."""
    plt = _pyplot()
    fig, (lin, log) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, scale in ((lin, "linear"), (log, "log")):
        ax.plot(grid, density, color="tab:blue", lw=1.2, label="full H")
        if blocks:
            for k, (name, values) in enumerate(blocks.items()):
                ax.plot(grid, np.maximum(values, 1e-300), lw=0.7, alpha=0.6, color=f"C{(k % 8) + 2}",
                        label=name if len(blocks) <= 8 else None)
            ax.plot(grid, np.maximum(sum(blocks.values()), 1e-300), color="black", ls="--", lw=1.1,
                    label="block-diagonal (sum of blocks)")
        ax.set_yscale(scale)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density" + (" (log)" if scale == "log" else ""))
        ax.plot(ritz_values, np.zeros_like(ritz_values) if scale == "linear" else
                np.full_like(ritz_values, max(density.max() * 1e-8, 1e-300)), "|", color="tab:red", ms=8, alpha=0.5)
    positive = density[density > 0]
    if positive.size:
        log.set_ylim(max(positive.min(), density.max() * 1e-8), density.max() * 3)
    if blocks:
        lin.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@exclusive
def plot_blocks(path: str, *, blocks: list[str], rel_error: np.ndarray, cosine: np.ndarray, title: str) -> None:
    """Per-block relative error and cosine (rows: probes), as mean with a +-std bar."""
    plt = _pyplot()
    x = np.arange(len(blocks))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(blocks) + 2), 6), sharex=True)
    for ax, values, label in ((ax1, rel_error, "relative error"), (ax2, cosine, "cosine")):
        ax.bar(x, values.mean(axis=0), yerr=values.std(axis=0) if values.shape[0] > 1 else None, capsize=3,
               color="tab:orange" if label == "cosine" else "tab:blue")
        ax.set_ylabel(label)
        ax.axhline(1.0 if label == "cosine" else 0.0, color="gray", lw=0.8, ls="--")
    ax2.set_xticks(x, blocks, rotation=60, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
