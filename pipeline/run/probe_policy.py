"""How many SLQ probes a run takes (``lanczos.probes``): a fixed count, or ``auto``. A policy: it decides, the driver
queues the probes it names.

With ``auto`` the first wave is max(2, num_groups) probes (two are the fewest with a standard error and two
halves), then one wave of ``num_groups`` probes at a time, each decided once every probe queued so far has
finished: more probes until the trace's standard error is <= ``trace.rtol`` x |trace| (unless the Hutch++ task
estimates the trace, with its own target) and the first half's density is within ``density.tol`` of the second
half's (``hessian_core.convergence``), or ``lanczos.max_probes``. A resumed run keeps every probe an earlier
invocation finished or checkpointed, and decides from what is finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hessian_core.convergence import ProbesConvergence, probes_convergence
from hessian_core.quadrature import RitzRule

from .config import RunConfig


@dataclass(frozen=True, kw_only=True)
class ProbesDecision:
    """Probe ids to queue now, and (once decided) why the run takes no more: ``converged`` or ``max_probes``."""

    queue: tuple[int, ...] = ()
    stopped: str | None = None
    figures: ProbesConvergence | None = None

    def as_record(self, *, probes: int) -> dict:
        return {"probes": probes, "stopped": self.stopped,
                **(self.figures.as_record() if self.figures is not None else {})}


class ProbesPolicy:
    """``make_decision`` over the finished probes' rules and the probe ids queued so far (pure); ``begin`` and
    ``finished`` keep the count of queued ids across a run and return the ids to queue."""

    def __init__(self, config: RunConfig, *, dimension: int):
        self.queued = 0  # probe ids 0..queued-1 are queued or finished
        self.decision: ProbesDecision | None = None  # the last decision that stopped the probes
        lz = config.lanczos
        self.auto = lz.probes == "auto"
        self.most = lz.probe_budget
        self.wave = max(1, config.cluster.num_groups)
        self.first = min(self.most, max(2, self.wave)) if self.auto else self.most
        self.dimension = dimension
        # a trace task (Hutch++ or deflated) meets the trace target on its own: the probes then serve the density
        self.trace_rtol = config.trace.rtol if config.trace.estimator == "slq" else float("inf")
        self.density_tol = config.density.tol

    def begin(self, rules: Mapping[int, RitzRule], *, started: set[int]) -> list[int]:
        """The probe ids a run (or a resumed one) queues first: the first wave, and every probe an earlier
        invocation checkpointed (its work is kept); past the finished ones, the decision's next wave."""
        self.queued = self.first_count(set(rules), started)
        ids = [pid for pid in range(self.queued) if pid not in rules]
        return ids or self.finished(rules)

    def first_count(self, finished: set[int], started: set[int]) -> int:
        """How many probe ids (0..n-1) a run begins with, ``finished`` and ``started`` (checkpointed) included."""
        if not self.auto:
            return self.most
        return min(self.most, max([self.first, *(pid + 1 for pid in finished | started)]))

    def finished(self, rules: Mapping[int, RitzRule]) -> list[int]:
        """A probe finished (``rules``: all finished so far): the ids to queue next (often none)."""
        decision = self.make_decision(rules, queued=self.queued)
        if decision.stopped:
            self.decision = decision
        self.queued += len(decision.queue)
        return list(decision.queue)

    def make_decision(self, rules: Mapping[int, RitzRule], *, queued: int) -> ProbesDecision:
        """``rules``: every finished probe's rule by id; ``queued``: how many probe ids are queued or finished (ids
        0..queued-1). Nothing to decide while a queued probe is still running."""
        if not self.auto:
            return ProbesDecision(stopped="fixed" if len(rules) >= self.most else None)
        if len(rules) < queued:
            return ProbesDecision()
        figures = probes_convergence([rules[pid] for pid in sorted(rules)], dimension=self.dimension)
        if figures.holds(trace_rtol=self.trace_rtol, density_tol=self.density_tol):
            return ProbesDecision(stopped="converged", figures=figures)
        if queued >= self.most:
            return ProbesDecision(stopped="max_probes", figures=figures)
        return ProbesDecision(queue=tuple(range(queued, min(queued + self.wave, self.most))), figures=figures)
