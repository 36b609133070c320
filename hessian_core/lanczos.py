"""The Lanczos iteration over any symmetric operator on a ParamSpace, resumable one step at a time.

Vectors are stored in a chosen dtype; every scalar is float64. Per step: one matvec, one all-reduce for
alpha, one for all the reorthogonalization coefficients (when enabled) and one for beta, so at most
3 <= 2 + r scalar all-reduces. Only the vectors reorthogonalization needs are kept: the last two
for ``none``, the last ``window`` for ``window``, all of them for ``full``.

Where the kept vectors live is ``vectors``: ``device`` (rows of one device matrix) or ``host`` (one host
matrix, pinned where CUDA exists; the device holds only the newest vector and the rows being streamed through
it, one at a time: ``stream_rows``). Both take the same arithmetic, row by row in row order, so they give the
same bits wherever the device is the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .vectors import FlatVector, ParamSpace, Vector

REORTH_MODES = ("none", "window", "full")
VECTOR_PLACES = ("device", "host")
# device rows a host-held window needs besides its newest vector: the row being used and, on CUDA, the next one
# copied in beside it on a side stream (hessian_core.lanczos.stream_rows)
STAGING_ROWS = {"cuda": 2, "cpu": 1}


def _host_rows(count: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host matrix for ``count`` rows, pinned where the device is a GPU (so its copies can be asynchronous)."""
    return torch.empty((count, n), dtype=dtype, pin_memory=device.type == "cuda")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, made once."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def stream_rows(rows: Tensor, indices: Sequence[int], device: torch.device) -> Iterator[Tensor]:
    """``rows[i]`` for each i in ``indices``, copied to ``device`` one at a time. On CUDA the next row's copy runs
    on a side stream while the caller computes with the current one (two device rows, each reused only after the
    compute stream is done with it); elsewhere one device row is refilled for each."""
    if device.type != "cuda":
        staging = torch.empty(rows.shape[1], dtype=rows.dtype, device=device)
        for i in indices:
            staging.copy_(rows[i])
            yield staging
        return
    compute, side = torch.cuda.current_stream(device), _side_stream(device)
    buffers = [torch.empty(rows.shape[1], dtype=rows.dtype, device=device) for _ in range(2)]
    for b in buffers:  # a copy still in flight when the caller stops early keeps its buffer from reuse
        b.record_stream(side)
    copied = [torch.cuda.Event(), torch.cuda.Event()]
    used = [torch.cuda.Event(), torch.cuda.Event()]  # an event never recorded is waited on as done

    def fetch(k: int) -> None:
        side.wait_event(used[k % 2])
        with torch.cuda.stream(side):
            buffers[k % 2].copy_(rows[indices[k]], non_blocking=True)
            copied[k % 2].record(side)

    if indices:
        fetch(0)
    for k in range(len(indices)):
        if k + 1 < len(indices):
            fetch(k + 1)
        compute.wait_event(copied[k % 2])
        yield buffers[k % 2]
        used[k % 2].record(compute)


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
    # vectors=host: ``rows`` is a host matrix and ``head`` the newest vector on the compute device; None: the
    # rows are on the compute device and the newest vector is one of them
    head: Tensor | None = None

    @property
    def on_host(self) -> bool:
        return self.head is not None

    @property
    def newest(self) -> Tensor:
        """The newest vector (q_j) where the matvec runs."""
        return self.head if self.head is not None else self.rows[self.order[-1]]

    def kept_rows(self, indices: Sequence[int]) -> Iterator[Tensor]:
        """The rows ``indices`` on the compute device, one at a time (views of ``rows``, or streamed from host);
        the newest vector is never copied, its device copy is used."""
        if self.head is None:
            yield from (self.rows[i] for i in indices)
            return
        newest = self.order[-1]
        streamed = [i for i in indices if i != newest]
        rows = stream_rows(self.rows, streamed, self.head.device)
        for i in indices:
            yield self.head if i == newest else next(rows)

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
                   device: torch.device | None = None, order: Sequence[int] | None = None,
                   vectors: str = "device") -> LanczosState:
        """A state holding ``basis`` (oldest first), copied once into rows allocated for ``capacity`` vectors;
        ``order`` puts basis[j] in row order[j] (default: row j). A resumed state must keep the rows where the
        interrupted run had them: the reorthogonalization sums over rows in row order, so another placement
        changes the last bits of every later step. ``vectors``: where the rows live (see the module's doc);
        ``device`` is where the arithmetic runs."""
        if vectors not in VECTOR_PLACES:
            raise ValueError(f"vectors {vectors!r}: expected one of {VECTOR_PLACES}")
        order = list(range(len(basis))) if order is None else list(order)
        if sorted(order) != list(range(len(basis))):
            raise ValueError(f"order must be a permutation of 0..{len(basis) - 1}, got {order}")
        device = device or basis[0].device
        count, n = max(capacity, len(basis)), basis[0].numel()
        rows = (_host_rows(count, n, basis[0].dtype, device) if vectors == "host" else
                torch.empty((count, n), dtype=basis[0].dtype, device=device))
        for row, b in zip(order, basis):
            rows[row].copy_(b.reshape(-1))
        head = rows[order[-1]].to(device, copy=True) if vectors == "host" else None
        return cls(list(alphas), list(betas), rows, order, list(shapes), stopped, head)

    def _grown(self, capacity: int) -> Tensor:
        """``rows`` copied into a matrix of ``capacity`` rows in the same place (host, pinned or not, or device)."""
        if self.head is not None:
            bigger = _host_rows(capacity, self.rows.shape[1], self.rows.dtype, self.head.device)
        else:
            bigger = self.rows.new_empty((capacity, self.rows.shape[1]))
        bigger[: self.rows.shape[0]] = self.rows
        return bigger

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` vectors at once, so that pushes never grow the matrix."""
        if self.rows.shape[0] < capacity:
            self.rows = self._grown(capacity)

    def push(self, flat: Tensor, *, scale: float = 1.0, keep: int | None) -> None:
        """Store the next vector, evicting the oldest once ``keep`` are held (None: keep all, growing).

        Rows fill from 0 upwards and are only reused by eviction, so rows 0..len(order)-1 hold the vectors."""
        if keep is not None and len(self.order) >= keep:
            row = self.order.pop(0)
        elif len(self.order) < self.rows.shape[0]:
            row = len(self.order)
        else:
            grown = self.rows.shape[0] * 2 if keep is None else min(self.rows.shape[0] * 2, keep)
            self.rows, row = self._grown(grown), self.rows.shape[0]
        target = self.rows[row] if self.head is None else self.head  # the newest vector, where it is computed with
        if flat.dtype == target.dtype:
            torch.mul(flat, scale, out=target)
        else:
            target.copy_(flat.mul_(scale))
        if self.head is not None:
            self.rows[row].copy_(self.head)  # the host copy is the head's exact bits
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
                  capacity: int = 0, vectors: str = "device") -> LanczosState:
    norm = space.norm(v0)
    if not norm > 0:
        raise ValueError("the Lanczos start vector is zero")
    flat = torch.cat([t.reshape(-1).to(vector_dtype) for t in v0]).div_(norm)
    return LanczosState.from_basis([flat], shapes=[t.shape for t in v0], capacity=capacity, vectors=vectors,
                                   device=space.device)


def _row_dots(rows: Iterator[Tensor], w: Tensor) -> Tensor:
    """<r, w> for each row (local partial sums), in at least float32, as float64. One row at a time, so that a
    window streamed from host memory and one held on the device give the same bits (a matrix-vector product over
    all rows sums in another order than one over each)."""
    wc = None
    dots = []
    for r in rows:
        if r.dtype == w.dtype:
            dots.append(torch.mv(r.unsqueeze(0), w))
        else:
            if wc is None:
                wc = w.to(torch.promote_types(torch.promote_types(r.dtype, w.dtype), torch.float32))
            dots.append(torch.dot(r.to(wc.dtype), wc).unsqueeze(0))
    return torch.cat(dots).double()


def _row_subtract(w: Tensor, rows: Iterator[Tensor], coeffs: Tensor) -> None:
    """w -= sum_j coeffs[j] rows[j] in place, one row at a time (in row order)."""
    same, values = coeffs.to(w), None
    for j, r in enumerate(rows):
        if r.dtype == w.dtype:
            w.addmv_(r.unsqueeze(1), same[j:j + 1], alpha=-1.0)
        else:
            values = coeffs.tolist() if values is None else values  # one device sync, not one per row
            w.add_(r, alpha=-values[j])  # in-place add_ computes across dtypes without a converted copy of r


def lanczos_step(state: LanczosState, matvec: Callable[[Vector], Vector], *, space: ParamSpace,
                 reorth: str = "window", window: int = 8, tol: float = 1e-10) -> None:
    """Advance the recurrence by one step: beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}."""
    _check_options(reorth, window)
    if state.stopped:
        raise RuntimeError(f"Lanczos already stopped ({state.stopped})")
    q = state.newest
    hq = matvec(state.vector(q))
    w = hq.flat if isinstance(hq, FlatVector) else torch.cat([t.reshape(-1) for t in hq])
    del hq
    alpha = float(space.all_reduce(_row_dots(iter([q]), w)))
    _check_finite("alpha", alpha, state.steps_done)
    w.add_(q, alpha=-alpha)
    if state.betas:
        w.add_(next(state.kept_rows([state.order[-2]])), alpha=-state.betas[-1])
    # Reorthogonalization is a second Gram-Schmidt pass after the three-term recurrence (one pass alone,
    # folding alpha into it, loses the eigenvalues of the tests' matrices at m = n): one pass over the kept
    # rows for the dots, one all-reduce, one pass to subtract. The kept vectors are rows 0..k-1 in some order.
    indices = None
    if reorth == "full" or (reorth == "window" and window >= 2):
        indices = list(range(len(state.order)))
    elif reorth == "window" and window == 1:
        indices = [state.order[-1]]
    if indices is not None:
        coeffs = space.all_reduce(_row_dots(state.kept_rows(indices), w), to_host=False)
        _row_subtract(w, state.kept_rows(indices), coeffs)
    beta = float(space.all_reduce(_row_dots(iter([w]), w)).clamp_min(0).sqrt())
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
            state: LanczosState | None = None, on_step: Callable[[LanczosState], None] | None = None,
            vectors: str = "device",
            stop: Callable[[Sequence[float], Sequence[float]], bool] | None = None) -> LanczosResult:
    """Run ``steps`` Lanczos steps from v0, or continue ``state`` (then v0 may be None) up to ``steps`` in all;
    stops early at an invariant subspace, or (``stop``, e.g. ``hessian_core.convergence.ProbeStopRule``) once
    ``stop(alphas, betas)`` holds: ``stopped`` is then "converged". ``vectors``: where a new state keeps its rows
    (a given state keeps its own)."""
    _check_options(reorth, window)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    capacity = _capacity(steps, reorth, window)
    if state is None:
        if v0 is None:
            raise ValueError("lanczos needs a start vector v0 or a state to continue")
        state = lanczos_start(v0, space=space, vector_dtype=vector_dtype, capacity=capacity, vectors=vectors)
    else:
        state.reserve(capacity)
    def converged() -> bool:  # checked before a step too: a resumed state may hold already
        return stop is not None and state.steps_done > 0 and not state.stopped and stop(state.alphas, state.betas)

    done = converged()
    while state.steps_done < steps and not state.stopped and not done:
        lanczos_step(state, matvec, space=space, reorth=reorth, window=window, tol=tol)
        if on_step is not None:
            on_step(state)
        done = converged()
    return LanczosResult(torch.tensor(state.alphas, dtype=torch.float64),
                         torch.tensor(state.betas, dtype=torch.float64),
                         state.stopped or ("converged" if done else "steps"))
