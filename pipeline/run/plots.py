"""Figures drawn from the result tables with matplotlib's Agg backend: density.png, blocks.png, approximations.png,
and the eigen task's eigen_mass.png and landscape.png."""

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
                 atoms: tuple[np.ndarray, np.ndarray] | None = None,
                 bulk: tuple[float, float] | None = None, blocks: dict[str, np.ndarray] | None = None) -> None:
    """Left: the cumulative spectral distribution of the SLQ measure (``atoms``: sorted values and weights), with
    the bulk shaded and the outliers beyond it marked; a linear density is a single spike at zero for a Hessian
    (its bulk), while the CDF shows the bulk's share and each outlier's. Right: the log density, with the Ritz
    values as a rug. Without ``atoms`` the left panel is the linear density. ``blocks`` (block -> its density on
    ``grid`` scaled by its share of the parameters) overlays, on the log density, the diagonal blocks' spectra and
    their sum, the spectrum of the block-diagonal approximation."""
    plt = _pyplot()
    fig, (lin, log) = plt.subplots(1, 2, figsize=(11, 4))
    if atoms is not None:
        values, weights = atoms
        lin.step(values, np.cumsum(weights), where="post", color="tab:blue", lw=1.2)
        lin.set_ylim(-0.02, 1.02)
        lin.set_ylabel("fraction of eigenvalues <= x")
        if bulk is not None:
            lin.axvspan(bulk[0], bulk[1], color="tab:green", alpha=0.15, label=f"bulk [{bulk[0]:.3g}, {bulk[1]:.3g}]")
            out = (values < bulk[0]) | (values > bulk[1])
            lin.plot(values[out], np.cumsum(weights)[out], "o", ms=3, color="tab:red",
                     label=f"outside the bulk: {weights[out].sum():.2g} of the mass")
            lin.legend(fontsize=8, loc="upper left")
        lin.set_title("cumulative spectral distribution", fontsize=10)
    else:
        lin.plot(grid, density, color="tab:blue", lw=1.2)
        lin.plot(ritz_values, np.zeros_like(ritz_values), "|", color="tab:red", ms=8, alpha=0.5)
        lin.set_ylabel("density")
    log.plot(grid, density, color="tab:blue", lw=1.2, label="full H")
    if blocks:
        for k, (name, values) in enumerate(blocks.items()):
            log.plot(grid, np.maximum(values, 1e-300), lw=0.7, alpha=0.6, color=f"C{(k % 8) + 2}",
                     label=name if len(blocks) <= 8 else None)
        log.plot(grid, np.maximum(sum(blocks.values()), 1e-300), color="black", ls="--", lw=1.1,
                 label="block-diagonal (sum of blocks)")
        log.legend(fontsize=7)
    log.set_yscale("log")
    log.set_ylabel("density (log)")
    log.set_title("smoothed density", fontsize=10)
    log.plot(ritz_values, np.full_like(ritz_values, max(density.max() * 1e-8, 1e-300)), "|", color="tab:red", ms=8,
             alpha=0.5)
    positive = density[density > 0]
    if positive.size:
        log.set_ylim(max(positive.min(), density.max() * 1e-8), density.max() * 3)
    for ax in (lin, log):
        ax.set_xlabel("eigenvalue")
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


@exclusive
def plot_approximations(path: str, df) -> None:
    """The paper's Table 6 extended to every approximation of the study: per block and for the whole vector, the
    relative error of A v and its cosine with H v, mean with a +-std bar over the probes, one bar per approximation."""
    plt = _pyplot()
    names = list(dict.fromkeys(df.approximation))
    blocks = list(dict.fromkeys(df.block))
    columns = blocks + ["whole"]
    x = np.arange(len(columns))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.35 * len(columns) * len(names) + 3), 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, whole, label in ((axes[0], "rel_error", "whole_rel_error", "relative error of A v"),
                                     (axes[1], "cosine", "whole_cosine", "cos(A v, H v)")):
        for j, name in enumerate(names):
            rows = df[df.approximation == name]
            table = rows.pivot(index="probe_id", columns="block", values=metric)[blocks]
            values = np.column_stack([table.to_numpy(), rows.drop_duplicates("probe_id")
                                      .set_index("probe_id").loc[table.index, whole].to_numpy()])
            ax.bar(x - 0.4 + (j + 0.5) * width, np.nanmean(values, axis=0), width,
                   yerr=np.nanstd(values, axis=0) if values.shape[0] > 1 else None, capsize=2,
                   color=colors[j % len(colors)], label=name)
        ax.axhline(1.0 if metric == "cosine" else 0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), fontsize=8, ncol=min(5, len(names)),
               frameon=False)
    axes[1].set_xticks(x, columns, rotation=60, ha="right", fontsize=8)
    fig.suptitle("Curvature approximations against the exact H v, per block and whole")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@exclusive
def plot_eigen_mass(path: str, *, blocks: list[str], mass: np.ndarray, eigenvalues: np.ndarray) -> None:
    """Where curvature lives: each eigenvector's squared mass per block (rows: eigenvectors, best first; each row
    sums to 1), a heatmap with the eigenvalues on the rows."""
    plt = _pyplot()
    k, b = mass.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * b + 3), max(3.2, 0.4 * k + 2.6)))
    image = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(mass.max()), 1e-12))
    ax.set_xticks(np.arange(b), blocks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(k), [f"u{i + 1} ({v:.4g})" for i, v in enumerate(eigenvalues[:k])], fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("eigenvector")
    if k * b <= 150:  # few cells: their values written in
        for i in range(k):
            for j in range(b):
                ax.text(j, i, f"{mass[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if mass[i, j] > 0.6 * float(mass.max()) else "white")
    fig.colorbar(image, ax=ax, label="squared mass")
    ax.set_title("Eigenvector mass per block", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@exclusive
def plot_landscape(path: str, *, t: np.ndarray, loss: np.ndarray, eigenvalues: np.ndarray,
                   grid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """The loss along theta + t u_1, with the quadratic model L(0) + L'(0) t + lambda_1 t^2 / 2 (L'(0) the grid's
    central difference at 0), and with ``grid`` (s, t, loss[s, t]) its contour over theta + s u_1 + t u_2, as
    PyHessian draws them."""
    plt = _pyplot()
    panels = int(len(t) > 0) + int(grid is not None)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if len(t):
        ax = axes.pop(0)
        ax.plot(t, loss, "o-", ms=3, color="tab:blue", lw=1.2, label="loss")
        c = len(loss) // 2
        slope = (loss[c + 1] - loss[c - 1]) / (t[c + 1] - t[c - 1])
        ax.plot(t, loss[c] + slope * t + 0.5 * eigenvalues[0] * t ** 2, "--", color="gray", lw=1.0,
                label=f"L(0) + L'(0) t + lambda_1 t^2 / 2 (lambda_1 = {eigenvalues[0]:.4g})")
        ax.set_xlabel("t (along u_1)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title("1-D slice along the top eigenvector", fontsize=10)
    if grid is not None:
        s, t2, values = grid
        ax = axes.pop(0)
        contour = ax.contourf(t2, s, values, levels=20, cmap="viridis")
        ax.contour(t2, s, values, levels=20, colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0.0], [0.0], "r+", ms=10)
        fig.colorbar(contour, ax=ax, label="loss")
        ax.set_xlabel(f"t (along u_2, lambda_2 = {eigenvalues[1]:.4g})" if len(eigenvalues) > 1 else "t (along u_2)")
        ax.set_ylabel("s (along u_1)")
        ax.set_title("2-D slice over (u_1, u_2)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
