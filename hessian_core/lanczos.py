"""The Lanczos iteration over any symmetric operator on a ParamSpace, resumable one step at a time.

Vectors are stored in a chosen dtype; every scalar is float64. Per step: one matvec, one all-reduce for
alpha, one for all the reorthogonalization coefficients (when enabled) and one for beta, so at most
3 <= 2 + r scalar all-reduces. Only the vectors reorthogonalization needs are kept: the last two
for ``none``, the last ``window`` for ``window``, all of them for ``full``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .vectors import FlatVector, ParamSpace, Vector

REORTH_MODES = ("none", "window", "full")


@dataclass
class LanczosState:
    """Everything needed to take the next step (and what a checkpoint saves).

    The kept Lanczos vectors are rows of one matrix ``rows`` [capacity, n_local] in the vector dtype, so the
    reorthogonalization against all of them is one matrix-vector product and one ``addmv``. ``order`` lists
    the rows holding vectors, oldest first; ``shapes`` turns a flat row back into per-parameter views.
    """

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    rows: Tensor | None = None
    order: list[int] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    stopped: str | None = None  # "invariant subspace" once the Krylov space is exhausted

    @property
    def steps_done(self) -> int:
        return len(self.alphas)

    @property
    def basis(self) -> list[Tensor]:
        """The kept vectors as flat views, most recent last (basis[-1] is the current q)."""
        return [self.rows[i] for i in self.order]

    @classmethod
    def from_basis(cls, basis: Sequence[Tensor], *, shapes: Sequence[torch.Size], alphas: Sequence[float] = (),
                   betas: Sequence[float] = (), stopped: str | None = None, capacity: int = 0,
                   device: torch.device | None = None, order: Sequence[int] | None = None) -> LanczosState:
        """A state holding ``basis`` (oldest first), copied once into rows allocated for ``capacity`` vectors;
        ``order`` puts basis[j] in row order[j] (default: row j). A resumed state must keep the rows where the
        interrupted run had them: the reorthogonalization sums over rows in row order, so another placement
        changes the last bits of every later step."""
        order = list(range(len(basis))) if order is None else list(order)
        if sorted(order) != list(range(len(basis))):
            raise ValueError(f"order must be a permutation of 0..{len(basis) - 1}, got {order}")
        rows = torch.empty((max(capacity, len(basis)), basis[0].numel()), dtype=basis[0].dtype,
                           device=device or basis[0].device)
        for row, b in zip(order, basis):
            rows[row].copy_(b.reshape(-1))
        return cls(list(alphas), list(betas), rows, order, list(shapes), stopped)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` vectors at once, so that pushes never grow the matrix."""
        if self.rows.shape[0] < capacity:
            bigger = self.rows.new_empty((capacity, self.rows.shape[1]))
            bigger[: self.rows.shape[0]] = self.rows
            self.rows = bigger

    def push(self, flat: Tensor, *, scale: float = 1.0, keep: int | None) -> None:
        """Store the next vector, evicting the oldest once ``keep`` are held (None: keep all, growing).

        Rows fill from 0 upwards and are only reused by eviction, so rows 0..len(order)-1 hold the vectors."""
        if keep is not None and len(self.order) >= keep:
            row = self.order.pop(0)
        elif len(self.order) < self.rows.shape[0]:
            row = len(self.order)
        else:
            grown = self.rows.shape[0] * 2 if keep is None else min(self.rows.shape[0] * 2, keep)
            bigger = self.rows.new_empty((grown, self.rows.shape[1]))
            bigger[: self.rows.shape[0]] = self.rows
            self.rows, row = bigger, self.rows.shape[0]
        if flat.dtype == self.rows.dtype:
            torch.mul(flat, scale, out=self.rows[row])
        else:
            self.rows[row].copy_(flat.mul_(scale))
        self.order.append(row)

    def vector(self, flat: Tensor) -> Vector:
        """Per-parameter views of a flat vector (what the matvec takes)."""
        sizes = [s.numel() for s in self.shapes]
        return [t.view(s) for t, s in zip(torch.split(flat, sizes), self.shapes)]


@dataclass(frozen=True)
class LanczosResult:
    alphas: Tensor  # float64 [m]: T[j, j]
    betas: Tensor  # float64 [m]: T[j, j+1]; the last one is the final residual norm
    stopped: str

    @property
    def steps(self) -> int:
        return int(self.alphas.numel())


def _check_options(reorth: str, window: int) -> None:
    if reorth not in REORTH_MODES:
        raise ValueError(f"reorth {reorth!r}: expected one of {REORTH_MODES}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")


def _kept_vectors(reorth: str, window: int) -> int | None:
    """How many recent Lanczos vectors to keep (None: all)."""
    if reorth == "full":
        return None
    if reorth == "window":
        return max(window, 2)
    return 2


def _capacity(steps: int, reorth: str, window: int) -> int:
    """Rows a run of ``steps`` steps ever holds: the start vector and one per step, or the kept window."""
    keep = _kept_vectors(reorth, window)
    return steps + 1 if keep is None else min(keep, steps + 1)


def lanczos_start(v0: Sequence[Tensor], *, space: ParamSpace, vector_dtype: torch.dtype,
                  capacity: int = 0) -> LanczosState:
    norm = space.norm(v0)
    if not norm > 0:
        raise ValueError("the Lanczos start vector is zero")
    flat = torch.cat([t.reshape(-1).to(vector_dtype) for t in v0]).div_(norm)
    return LanczosState.from_basis([flat], shapes=[t.shape for t in v0], capacity=capacity)


def _flat_dots(rows: Tensor, w: Tensor) -> Tensor:
    """rows @ w (local partial sums), in at least float32, as float64."""
    if rows.dtype == w.dtype:
        return torch.mv(rows, w).double()
    compute = torch.promote_types(torch.promote_types(rows.dtype, w.dtype), torch.float32)
    wc = w.to(compute)
    return torch.stack([torch.dot(r.to(compute), wc) for r in rows]).double()


def _flat_subtract(w: Tensor, rows: Tensor, coeffs: Tensor) -> None:
    """w -= rows^T coeffs in place."""
    if rows.dtype == w.dtype:
        w.addmv_(rows.t(), coeffs.to(w), alpha=-1.0)
    else:
        for r, c in zip(rows, coeffs.tolist()):
            w.add_(r, alpha=-c)  # in-place add_ computes across dtypes without a converted copy of r


def lanczos_step(state: LanczosState, matvec: Callable[[Vector], Vector], *, space: ParamSpace,
                 reorth: str = "window", window: int = 8, tol: float = 1e-10) -> None:
    """Advance the recurrence by one step: beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}."""
    _check_options(reorth, window)
    if state.stopped:
        raise RuntimeError(f"Lanczos already stopped ({state.stopped})")
    q = state.rows[state.order[-1]]
    hq = matvec(state.vector(q))
    w = hq.flat if isinstance(hq, FlatVector) else torch.cat([t.reshape(-1) for t in hq])
    del hq
    alpha = float(space.all_reduce(_flat_dots(q.unsqueeze(0), w)))
    _check_finite("alpha", alpha, state.steps_done)
    w.add_(q, alpha=-alpha)
    if state.betas:
        w.add_(state.rows[state.order[-2]], alpha=-state.betas[-1])
    # Reorthogonalization is a second Gram-Schmidt pass after the three-term recurrence (one pass alone,
    # folding alpha into it, loses the eigenvalues of the tests' matrices at m = n): one mv, one addmv, one
    # all-reduce. The kept vectors are rows 0..k-1 in some order, so all of them is a view, not a copy.
    rows = None
    if reorth == "full" or (reorth == "window" and window >= 2):
        rows = state.rows[: len(state.order)]
    elif reorth == "window" and window == 1:
        rows = q.unsqueeze(0)
    if rows is not None:
        _flat_subtract(w, rows, space.all_reduce(_flat_dots(rows, w), to_host=False))
    beta = float(space.all_reduce(_flat_dots(w.unsqueeze(0), w)).clamp_min(0).sqrt())
    _check_finite("beta", beta, state.steps_done)
    state.alphas.append(alpha)
    state.betas.append(beta)
    scale = max(max(abs(a) for a in state.alphas), max(state.betas[:-1], default=0.0))
    if beta <= tol * scale or beta == 0.0:
        state.stopped = "invariant subspace"
        return
    state.push(w, scale=1.0 / beta, keep=_kept_vectors(reorth, window))


def _check_finite(name: str, value: float, step: int) -> None:
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"Lanczos step {step}: {name} is {value} (non-finite HVP or loss)")


def lanczos(matvec: Callable[[Vector], Vector], v0: Sequence[Tensor] | None, *, space: ParamSpace, steps: int,
            reorth: str = "window", window: int = 8, vector_dtype: torch.dtype = torch.float32, tol: float = 1e-10,
            state: LanczosState | None = None,
            on_step: Callable[[LanczosState], None] | None = None) -> LanczosResult:
    """Run ``steps`` Lanczos steps from v0, or continue ``state`` (then v0 may be None) up to ``steps`` in all;
    stops early at an invariant subspace."""
    _check_options(reorth, window)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    capacity = _capacity(steps, reorth, window)
    if state is None:
        if v0 is None:
            raise ValueError("lanczos needs a start vector v0 or a state to continue")
        state = lanczos_start(v0, space=space, vector_dtype=vector_dtype, capacity=capacity)
    else:
        state.reserve(capacity)
    while state.steps_done < steps and not state.stopped:
        lanczos_step(state, matvec, space=space, reorth=reorth, window=window, tol=tol)
        if on_step is not None:
            on_step(state)
    return LanczosResult(torch.tensor(state.alphas, dtype=torch.float64),
                         torch.tensor(state.betas, dtype=torch.float64), state.stopped or "steps")
