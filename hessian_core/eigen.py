"""Top-k eigenpairs of any symmetric operator on a ParamSpace: thick-restart Lanczos, resumable one restart at a time.

The method is Wu & Simon's thick restart (TRLan, SIAM J. Matrix Anal. Appl. 22, 2000). A basis of at most
``basis`` vectors Q_j is grown by Lanczos steps with full reorthogonalization (one Gram-Schmidt pass after the
three-term recurrence, as ``hessian_core.lanczos`` does) and keeps the relation

    H Q_j = Q_j T_j + q_{j+1} c^T        (T_j symmetric, c the coupling of the next vector q_{j+1})

which makes the residual of a Ritz pair (theta, Q_j s) |c . s|, with no HVP (exact for a symmetric operator, to
rounding; an FD HVP is symmetric up to its error, which the FD bar covers). When the basis is full, a
restart computes the Ritz pairs of T_j, keeps the ``kept`` best of them (``which``: the largest ``LA``, the smallest
``SA`` or the largest in magnitude ``LM``) as the new basis Y = Q_j S, and continues from q_{j+1}: then T is
diagonal (the kept Ritz values) and c = S^T c (an arrowhead), and the relation holds again. Only basis + 1
vectors are ever held, never the whole Krylov basis.

A pair is converged when its residual is at most ``tol`` times the largest |Ritz value| seen so far (an estimate
of |H|'s norm from below). The run stops when the k wanted pairs are converged, when ``max_hvps`` HVPs are
spent (then the result says which are), or when the operator's whole space is spanned. When the Krylov space
becomes invariant (beta ~ 0) the run goes on from a random vector orthogonal to the basis. Like every Krylov
method (ARPACK's too) it finds a repeated eigenvalue's copies only through such fresh directions and cannot know
it holds them all: converged pairs are eigenpairs, but with exact multiplicities not necessarily the k extreme
ones. Every restart leaves the state ready to resume: ``EigenState`` is what ``hessian_core.eigen_checkpoint``
saves, and a run resumed from it takes the same arithmetic as one never interrupted, so it gives the same bits.

Vectors are flat rows of one matrix (this rank's elements of every parameter, in ``ParamSpace`` order); every
inner product goes through ``space.all_reduce``, so the same code runs on one process or on an FSDP2 group.
Per Lanczos step: one matvec and three scalar all-reduces (alpha, the reorthogonalization coefficients, beta); a
restart is local (one basis x basis eigenproblem and a rotation of the rows), with no collective at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .error_bars import ErrorBar, RayleighBound, fd_eigenvalue_bound, rayleigh_fd_bound
from .lanczos import _row_dots, _row_subtract
from .vectors import FlatVector, ParamSpace, Vector, probe_vector

WHICH = ("LA", "SA", "LM")
# beta below this times the operator's scale: the Krylov space is invariant, and a fresh random vector (orthogonal
# to the basis) carries on; one whose norm after orthogonalization is below EXHAUSTED means the basis spans it all
BREAKDOWN = 1e-10
EXHAUSTED = 1e-8
# the restart's rotation Y = Q S runs over column chunks of this many elements: a temporary of kept x chunk
ROTATION_CHUNK = 1 << 20


def default_basis(k: int) -> int:
    """The basis size when none is given: the k wanted vectors and as many again, at least 10 more."""
    return k + max(k, 10)


def kept_vectors(k: int, basis: int) -> int:
    """Ritz vectors a restart keeps: the k wanted and half the rest of the basis (so that each cycle adds about
    half a basis of new Krylov directions, and the next-best Ritz vectors are not lost at every restart)."""
    return min(k + (basis - k) // 2, basis - 1)


@dataclass
class EigenState:
    """Everything the next step or restart needs (and what a checkpoint saves).

    ``rows`` [basis + 1, n_local]: rows[:size] the basis Q_j (right after a restart: the kept Ritz vectors, best
    first), rows[size] the next vector q_{j+1}. ``projected`` float64 [basis + 1, basis] on the host:
    H Q_j = Q_{j+1} projected[:size + 1, :size], so projected[:size, :size] is T_j and projected[size, :size]
    the coupling c. ``norm_estimate``: the largest |Ritz value| any restart saw. ``draws``: random vectors drawn
    after breakdowns (each a pure function of ``seed`` and its index). ``stopped``: None while running, else
    ``converged``, ``max_hvps`` or ``invariant subspace``. ``layout``: (parameter name, start in the flattened
    global parameter, length) of each piece of a row on this rank, what a checkpoint names its elements by.
    """

    k: int
    which: str
    tol: float
    rows: Tensor
    projected: Tensor
    shapes: list[torch.Size]
    seed: int = 0
    size: int = 0
    hvps: int = 0
    restarts: int = 0
    draws: int = 0
    norm_estimate: float = 0.0
    stopped: str | None = None
    layout: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def basis(self) -> int:
        return self.rows.shape[0] - 1

    def vector(self, flat: Tensor) -> Vector:
        """Per-parameter views of a flat row (what the matvec takes)."""
        sizes = [math.prod(s) for s in self.shapes]
        return [t.view(s) for t, s in zip(torch.split(flat, sizes), self.shapes)]

    def _rows(self, count: int):
        return (self.rows[i] for i in range(count))


@dataclass(frozen=True, kw_only=True)
class EigenResult:
    """What ``thick_restart_lanczos`` (and ``hessian_core.eigenpairs``) found, best first in the order of ``which``.

    ``eigenvalues``, ``residuals`` (|H u - lambda u| of the operator the run saw) and ``converged`` (residual <=
    tol x norm_estimate) are float64/bool arrays of the k pairs; ``eigenvectors`` are unit Vectors of local
    shards (orthonormal to rounding). ``hvps``: the solver's HVPs; the model-level fields (eps, loss, names, the
    HVPs of the eps calibration in ``hvp_count``) are filled by ``eigenpairs``. ``space``: the ParamSpace the
    vectors live on (not part of equality)."""

    eigenvalues: np.ndarray
    eigenvectors: list[Vector]
    residuals: np.ndarray
    converged: np.ndarray
    which: str
    tol: float
    norm_estimate: float
    hvps: int
    restarts: int
    stopped: str
    hvp_relative_error: float | None = None  # one FD HVP's estimated relative error (EpsChoice.relative_error)
    eps: float = math.nan
    eps_choice: object | None = None  # hessian_core.eps.EpsChoice
    loss: float = math.nan
    num_params: int = 0
    param_names: list[str] = field(default_factory=list)
    hvp_count: int = 0
    seconds: float = math.nan
    space: ParamSpace | None = field(default=None, repr=False, compare=False)
    # the FD Rayleigh quotients <u_i, H_eps u_i> and <u_i, H_2eps u_i> of each eigenvector (hessian_core.eigen_api
    # .with_fd_bars), the round-off coefficient c of one HVP (c / eps) and the FD scheme: each eigenvalue's own FD bar
    rayleigh_eps: np.ndarray | None = field(default=None, compare=False)
    rayleigh_2eps: np.ndarray | None = field(default=None, compare=False)
    roundoff: float | None = None
    scheme: str = "central"

    @property
    def k(self) -> int:
        return int(self.eigenvalues.size)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def rayleigh_bounds(self) -> list[RayleighBound] | None:
        """Each eigenvalue's FD bar from its own eigenvector's Rayleigh quotients at eps and 2 eps, in parts
        (``hessian_core.error_bars.rayleigh_fd_bound``); None where they were not measured."""
        if self.rayleigh_eps is None or self.rayleigh_2eps is None:
            return None
        return [rayleigh_fd_bound(ritz_value=float(v), rq_eps=float(a), rq_2eps=float(b), eps=self.eps,
                                  roundoff=self.roundoff, scheme=self.scheme)
                for v, a, b in zip(self.eigenvalues, self.rayleigh_eps, self.rayleigh_2eps)]

    @property
    def fd_bounds(self) -> np.ndarray:
        """Each eigenvalue's FD HVP bound: from its eigenvector's Rayleigh quotients at eps and 2 eps where they
        were measured (``rayleigh_bounds``; ``eigenpairs`` does), else the Weyl bound of lambda_max's bar
        (hessian_core.error_bars); nan when the HVP's error is unknown (the exact operator, or a fixed eps not
        assessed)."""
        bounds = self.rayleigh_bounds
        if bounds is not None:
            return np.array([b.total for b in bounds], dtype=np.float64)
        bound = fd_eigenvalue_bound(hvp_relative_error=self.hvp_relative_error, operator_norm=self.norm_estimate)
        return np.full(self.k, bound)

    @property
    def error_bars(self) -> list[ErrorBar]:
        """lambda_i = value +- (residual + fd): the residual puts an eigenvalue of the operator the run saw within
        it, the FD bound moves it to H's."""
        return [ErrorBar(float(v), float(r), float(f)) for v, r, f in zip(self.eigenvalues, self.residuals,
                                                                           self.fd_bounds)]

    def to_arrow(self):
        """One row per pair (``eigenpairs.parquet``): index int32, eigenvalue, residual, fd_bound, error (residual
        + fd_bound, the bar), converged bool."""
        import pyarrow as pa

        bars = self.error_bars
        return pa.table({"index": pa.array(np.arange(self.k, dtype=np.int32)),
                         "eigenvalue": pa.array(self.eigenvalues, pa.float64()),
                         "residual": pa.array(self.residuals, pa.float64()),
                         "fd_bound": pa.array(self.fd_bounds, pa.float64()),
                         "error": pa.array([b.total for b in bars], pa.float64()),
                         "converged": pa.array(self.converged, pa.bool_())})

    def summary(self) -> dict:
        """The scalars of a run (run.json's ``eigen``)."""
        return {"k": self.k, "which": self.which, "tol": self.tol, "eigenvalues": self.eigenvalues.tolist(),
                "residuals": self.residuals.tolist(), "converged": self.converged.tolist(),
                "all_converged": self.all_converged, "norm_estimate": self.norm_estimate, "hvps": self.hvps,
                "restarts": self.restarts, "stopped": self.stopped, "hvp_relative_error": self.hvp_relative_error,
                "eps": self.eps, "fd_bounds": self.fd_bounds.tolist(), "hvp_count": self.hvp_count,
                "seconds": self.seconds}


def _check(k: int, which: str, tol: float, basis: int, dimension: int) -> None:
    if which not in WHICH:
        raise ValueError(f"which {which!r}: expected one of {WHICH}")
    if not 1 <= k <= dimension:
        raise ValueError(f"k must be in [1, {dimension}] (the operator's dimension), got {k}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if basis < min(k + 2, dimension):
        raise ValueError(f"basis must be at least k + 2 = {k + 2} (or the whole dimension), got {basis}")


def eigen_start(v0: Sequence[Tensor], *, space: ParamSpace, k: int, which: str = "LA", tol: float = 1e-4,
                basis: int | None = None, vector_dtype: torch.dtype = torch.float64, seed: int = 0) -> EigenState:
    """A state whose next vector is v0 / |v0|, with room for ``basis`` vectors (default ``default_basis(k)``,
    capped at the operator's dimension)."""
    basis = min(basis or default_basis(k), space.numel)
    _check(k, which, tol, basis, space.numel)
    norm = space.norm(v0)
    if not norm > 0:
        raise ValueError("the start vector is zero")
    rows = torch.zeros((basis + 1, space.local_numel), dtype=vector_dtype, device=space.device)
    rows[0].copy_(torch.cat([t.reshape(-1) for t in v0])).div_(norm)
    return EigenState(k=k, which=which, tol=float(tol), rows=rows,
                      projected=torch.zeros((basis + 1, basis), dtype=torch.float64), shapes=[t.shape for t in v0],
                      seed=seed, layout=[(s.name, s.flat_start, s.local_numel) for s in space.shards])


def _dots(space: ParamSpace, rows, w: Tensor, *, to_host: bool = True) -> Tensor:
    return space.all_reduce(_row_dots(rows, w), to_host=to_host)


def _orthogonalize(state: EigenState, w: Tensor, count: int, *, space: ParamSpace) -> None:
    """w minus its components along rows[:count]: one pass of dots (one all-reduce), one of subtractions."""
    coeffs = _dots(space, state._rows(count), w, to_host=False)
    _row_subtract(w, state._rows(count), coeffs)


def eigen_step(state: EigenState, matvec: Callable[[Vector], Vector], *, space: ParamSpace) -> None:
    """One Lanczos step (one matvec): the next vector joins the basis, and a new next vector is made."""
    if state.stopped:
        raise RuntimeError(f"the eigen run already stopped ({state.stopped})")
    j = state.size
    if j >= state.basis:
        raise RuntimeError("the basis is full: restart first (eigen_restart)")
    q = state.rows[j]
    hq = matvec(state.vector(q))
    w = hq.flat if isinstance(hq, FlatVector) else torch.cat([t.reshape(-1) for t in hq])
    del hq
    w = w.to(state.rows.dtype)
    alpha = float(_dots(space, iter([q]), w)[0])
    if not math.isfinite(alpha):
        raise FloatingPointError(f"eigen step {state.hvps}: alpha is {alpha} (non-finite HVP or loss)")
    coupling = state.projected[j, :j].clone()
    # the three-term (arrowhead after a restart) recurrence, then a full reorthogonalization pass
    _row_subtract(w, state._rows(j + 1), torch.cat([coupling, torch.tensor([alpha], dtype=torch.float64)]))
    _orthogonalize(state, w, j + 1, space=space)
    beta = math.sqrt(max(float(_dots(space, iter([w]), w)[0]), 0.0))
    if not math.isfinite(beta):
        raise FloatingPointError(f"eigen step {state.hvps}: beta is {beta} (non-finite HVP or loss)")
    state.projected[j, j] = alpha
    state.projected[:j, j] = coupling
    state.hvps += 1
    state.size = j + 1
    scale = max(state.norm_estimate, abs(alpha), float(coupling.abs().max()) if j else 0.0)
    if beta > BREAKDOWN * scale and beta > 0:
        state.rows[j + 1].copy_(w.div_(beta))
        state.projected[j + 1, j] = beta
        return
    _fresh_direction(state, space=space)


def _fresh_direction(state: EigenState, *, space: ParamSpace) -> None:
    """After a breakdown (an invariant Krylov space): the next vector is a random one orthogonal to the basis,
    coupled to nothing, or none at all when the basis spans the whole space (then the run stops)."""
    j = state.size
    state.projected[j, :j] = 0.0
    nxt = state.rows[j]
    nxt.zero_()
    if j < space.numel:
        state.draws += 1
        z = probe_vector(space, seed=state.seed, probe_index=state.draws, kind="gaussian", dtype=state.rows.dtype)
        torch.cat([t.reshape(-1) for t in z], out=nxt)
        for _ in range(2):  # twice is enough (Kahan / Parlett) for a vector that starts far from the span
            _orthogonalize(state, nxt, j, space=space)
        norm = math.sqrt(max(float(_dots(space, iter([nxt]), nxt)[0]), 0.0))
        if norm > EXHAUSTED:
            nxt.div_(norm)
            return
        nxt.zero_()
    state.stopped = "invariant subspace"


def _wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    key = {"LA": -theta, "SA": theta, "LM": -np.abs(theta)}[which]
    return np.argsort(key, kind="stable")


def _rotate(state: EigenState, s: Tensor) -> None:
    """rows[:l] = (rows[:j]^T s)^T for s [j, l], in place: column chunk by column chunk, each output row summed
    over the old rows in row order (the same arithmetic wherever the rows live or were loaded from)."""
    j, kept = s.shape
    n = state.rows.shape[1]
    tmp = state.rows.new_empty((kept, min(ROTATION_CHUNK, n)))
    negated = -s
    for c0 in range(0, n, ROTATION_CHUNK):
        c1 = min(c0 + ROTATION_CHUNK, n)
        for i in range(kept):
            out = tmp[i, :c1 - c0]
            out.zero_()
            _row_subtract(out, (state.rows[r, c0:c1] for r in range(j)), negated[:, i])
        state.rows[:kept, c0:c1].copy_(tmp[:, :c1 - c0])


def eigen_restart(state: EigenState, *, final: bool = False) -> bool:
    """Rayleigh-Ritz on the basis, the convergence check, then the thick restart: the basis becomes the kept Ritz
    vectors (best first), T their values and the coupling their residual components. ``final``: the budget is
    spent, stop whatever converged. Returns True when the run is finished (``state.stopped`` says why); a finished
    state still holds the kept vectors, so it can be resumed with a larger budget or a tighter tol."""
    j = state.size
    if j == 0:
        raise RuntimeError("nothing to restart from: take a step first")
    t = state.projected[:j, :j]
    theta, s = torch.linalg.eigh((t + t.T) / 2)
    # a sign per Ritz vector that does not depend on rounding: its largest coefficient positive
    lead = s.abs().argmax(dim=0)
    s = s * torch.where(s[lead, torch.arange(j)] < 0, -1.0, 1.0)
    coupling = state.projected[j, :j] @ s
    values = theta.numpy()
    order = _wanted_order(values, state.which)
    state.norm_estimate = max(state.norm_estimate, float(np.abs(values).max()))
    wanted = order[:state.k]
    done = len(wanted) == state.k and bool(np.all(np.abs(coupling.numpy()[wanted])
                                                 <= state.tol * state.norm_estimate))
    if done:
        state.stopped = "converged"
    elif final:
        state.stopped = "max_hvps"
    kept = min(j, max(state.k, kept_vectors(state.k, state.basis)))
    keep = torch.from_numpy(order[:kept].copy())
    _rotate(state, s[:, keep].to(state.rows.device))
    state.rows[kept].copy_(state.rows[j])
    projected = torch.zeros_like(state.projected)
    projected[torch.arange(kept), torch.arange(kept)] = theta[keep]
    projected[kept, :kept] = coupling[keep]
    state.projected = projected
    state.size = kept
    state.restarts += 1
    return state.stopped is not None


def eigen_cycle(state: EigenState, matvec: Callable[[Vector], Vector], *, space: ParamSpace,
                max_hvps: int) -> bool:
    """Lanczos steps until the basis is full (or the budget is spent, or the space spanned), then one restart.
    Returns True when the run is finished. A state between cycles is what checkpoints hold."""
    while state.size < state.basis and state.hvps < max_hvps and not state.stopped:
        eigen_step(state, matvec, space=space)
    return eigen_restart(state, final=state.hvps >= max_hvps)


def _converged(state: EigenState) -> np.ndarray:
    """Which of the k best pairs of a state just restarted meet its tol."""
    residuals = state.projected[state.size, :min(state.k, state.size)].abs().numpy()
    return residuals <= state.tol * state.norm_estimate


def eigen_result(state: EigenState, *, space: ParamSpace) -> EigenResult:
    """The k best pairs of a state just restarted (a finished one): copies of its first rows, their Ritz values
    and residuals."""
    count = min(state.k, state.size)
    values = state.projected.diagonal()[:count].numpy().copy()
    residuals = state.projected[state.size, :count].abs().numpy().copy()
    flat = state.rows[:count].clone()
    return EigenResult(eigenvalues=values, eigenvectors=[FlatVector(f, state.shapes) for f in flat],
                       residuals=residuals, converged=_converged(state),
                       which=state.which, tol=state.tol, norm_estimate=state.norm_estimate, hvps=state.hvps,
                       restarts=state.restarts, stopped=state.stopped or "running", num_params=space.numel,
                       param_names=list(space.names), space=space)


def thick_restart_lanczos(matvec: Callable[[Vector], Vector], v0: Sequence[Tensor] | None = None, *,
                          space: ParamSpace, k: int = 5, which: str = "LA", tol: float = 1e-4, max_hvps: int = 1000,
                          basis: int | None = None, vector_dtype: torch.dtype = torch.float64, seed: int = 0,
                          state: EigenState | None = None,
                          on_restart: Callable[[EigenState], None] | None = None) -> EigenResult:
    """The k eigenpairs of the symmetric operator ``matvec`` selected by ``which`` (``LA`` largest, ``SA``
    smallest, ``LM`` largest magnitude), each to residual <= tol x |lambda_max| (estimated), or what converged
    within ``max_hvps`` HVPs.

    v0: the start vector (default: a Gaussian probe, a pure function of ``seed``); ``state``: continue a saved
    run instead (its k and which; ``tol`` and ``max_hvps`` may differ from the run that wrote it).
    ``on_restart(state)`` is called after every restart: where a checkpoint is taken. ``basis``: vectors held
    (default ``default_basis(k)``); memory is basis + 1 vectors plus one rotation chunk per kept vector.
    """
    if max_hvps < 1:
        raise ValueError(f"max_hvps must be >= 1, got {max_hvps}")
    if state is None:
        if v0 is None:
            v0 = probe_vector(space, seed=seed, probe_index=0, kind="gaussian", dtype=vector_dtype)
        state = eigen_start(v0, space=space, k=k, which=which, tol=tol, basis=basis, vector_dtype=vector_dtype,
                            seed=seed)
    else:
        if (state.k, state.which) != (k, which):
            raise ValueError(f"the state is of a run with k={state.k}, which={state.which!r}; "
                             f"got k={k}, which={which!r}")
        state.tol = float(tol)
        if state.stopped in ("converged", "max_hvps"):  # a new budget or tol: check again, go on if needed
            state.stopped = None
            if state.size >= state.k and _converged(state).all():
                state.stopped = "converged"
            elif state.hvps >= max_hvps:
                state.stopped = "max_hvps"
            if state.stopped:
                return eigen_result(state, space=space)
    finished = False
    while not finished:
        finished = eigen_cycle(state, matvec, space=space, max_hvps=max_hvps)
        if on_restart is not None:
            on_restart(state)
    return eigen_result(state, space=space)
