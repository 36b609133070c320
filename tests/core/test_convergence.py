"""The stopping rules of ``lanczos.steps: auto`` and ``lanczos.probes: auto`` (hessian_core.convergence and the
driver's ProbesPolicy), against dense float64 Hessians and direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hessian_core import FiniteDifferenceHVP, ParamSpace, lanczos, probe_vector, ritz_rule
from hessian_core.convergence import ProbeStopRule, probe_convergence, probes_convergence
from hessian_core.lanczos import lanczos_start
from hessian_core.quadrature import SpectralMeasure, wasserstein1
from pipeline.run.config import load_config
from pipeline.run.probe_policy import ProbesPolicy

MAX_STEPS = 300


def test_auto_steps_stop_with_the_extremes_inside_their_bars(tiny_f64, tol=1e-3):
    """On the dense-referenced tiny models (FD at eps 1e-5: HVP error ~1e-10), a probe stops before the cap
    with both extreme Ritz values within their residual bound of the dense extremes (plus the FD error)."""
    arch, model, batches, hessian = tiny_f64
    values = torch.linalg.eigvalsh(hessian)
    scale = float(values.abs().max())
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=1e-5, space=space)
    for pid in range(1):
        run = lanczos(op.matvec, probe_vector(space, seed=3, probe_index=pid, dtype=torch.float64), space=space,
                      steps=MAX_STEPS, reorth="full", vector_dtype=torch.float64, stop=ProbeStopRule(tol=tol))
        assert run.stopped == "converged" and len(run.alphas) < MAX_STEPS, (arch, run.stopped, len(run.alphas))
        rule = ritz_rule(run.alphas, run.betas)
        slack = 1e-7 * scale
        assert abs(rule.values[-1] - float(values[-1])) <= rule.residuals[-1] + slack, (arch, pid)
        assert abs(rule.values[0] - float(values[0])) <= rule.residuals[0] + slack, (arch, pid)
        figures = probe_convergence(run.alphas.tolist(), run.betas.tolist())
        assert figures.holds(tol) and figures.extreme_residual <= tol and figures.settled <= tol


def test_a_probe_resumed_mid_run_stops_at_the_same_step_with_the_same_coefficients(tiny_f64):
    _, model, batches, _ = tiny_f64
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=1e-5, space=space)
    v0 = probe_vector(space, seed=1, probe_index=0, dtype=torch.float64)
    rule = ProbeStopRule(tol=1e-3)
    whole = lanczos(op.matvec, v0, space=space, steps=MAX_STEPS, reorth="full", vector_dtype=torch.float64, stop=rule)
    state = lanczos_start(v0, space=space, vector_dtype=torch.float64)
    lanczos(op.matvec, None, space=space, steps=7, reorth="full", state=state, stop=rule)  # the run killed at step 7
    resumed = lanczos(op.matvec, None, space=space, steps=MAX_STEPS, reorth="full", state=state, stop=rule)
    assert resumed.stopped == whole.stopped == "converged"
    assert torch.equal(resumed.alphas, whole.alphas) and torch.equal(resumed.betas, whole.betas)
    # a state that already holds the rule stops without another step
    again = lanczos(op.matvec, None, space=space, steps=MAX_STEPS, reorth="full", state=state, stop=rule)
    assert len(again.alphas) == len(whole.alphas) and again.stopped == "converged"


def _rules(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        a, b = rng.normal(size=12) * 2.0, np.abs(rng.normal(size=12)) + 0.2
        out.append(ritz_rule(a, b))
    return out


def test_probes_convergence_is_the_trace_stderr_and_the_halves_w1():
    rules = _rules(6)
    dim = 1000
    got = probes_convergence(rules, dimension=dim)
    per_probe = np.array([dim * float(r.weights @ r.values) for r in rules])
    assert got.trace == pytest.approx(per_probe.mean(), rel=1e-12)
    assert got.trace_stderr == pytest.approx(per_probe.std(ddof=1) / math.sqrt(6), rel=1e-12)
    first, second, whole = (SpectralMeasure.from_rules(rs) for rs in (rules[:3], rules[3:], rules))
    width = whole.values[-1] - whole.values[0]
    # W1 of two measures on the line, by the quantile functions (independent of wasserstein1's CDF form)
    qs = np.linspace(0, 1, 200_001)[1:-1]

    def quantile(m):  # the step function: the smallest value whose CDF reaches q
        return m.values[np.minimum(np.searchsorted(np.cumsum(m.weights), qs), len(m.values) - 1)]

    direct = np.mean(np.abs(quantile(first) - quantile(second)))
    assert got.halves_w1 == pytest.approx(direct / width, rel=1e-3)
    assert wasserstein1((first.values, first.weights), (second.values, second.weights)) == pytest.approx(direct, rel=1e-3)
    one = probes_convergence(rules[:1], dimension=dim)
    assert math.isinf(one.trace_rel_stderr) and not one.holds(trace_rtol=1e9, density_tol=1e9)


def _policy(*overrides: str) -> ProbesPolicy:
    config = load_config(None, ["model.path=builtin:demo", "data.path=builtin:demo", "lanczos.probes=auto",
                                "lanczos.max_probes=5", *overrides])
    return ProbesPolicy(config, dimension=1000)


def test_auto_probes_come_in_waves_until_both_targets_hold_or_max_probes():
    rules = _rules(8)
    policy = _policy("cluster.num_groups=1", "trace.rtol=1e-9")  # a trace target never met
    assert policy.begin({}, started=set()) == [0, 1]  # two: the fewest with a standard error and two halves
    assert policy.finished({0: rules[0]}) == []  # probe 1 still running: nothing to decide
    assert policy.finished({0: rules[0], 1: rules[1]}) == [2]
    done = {pid: rules[pid] for pid in range(3)}
    assert policy.finished(done) == [3]
    done[3] = rules[3]
    assert policy.finished(done) == [4]
    done[4] = rules[4]
    assert policy.finished(done) == [] and policy.decision.stopped == "max_probes"

    easy = _policy("cluster.num_groups=3", "trace.rtol=1e9", "density.tol=1e9")  # both targets met at once
    assert easy.begin({}, started=set()) == [0, 1, 2]  # a wave is num_groups probes
    assert easy.finished({pid: rules[pid] for pid in range(3)}) == [] and easy.decision.stopped == "converged"
    record = easy.decision.as_record(probes=3)
    assert record["stopped"] == "converged" and record["probes"] == 3 and record["trace_rel_stderr"] > 0

    # a resumed run keeps every probe an earlier invocation finished or checkpointed, then decides
    resumed = _policy("cluster.num_groups=1", "trace.rtol=1e-9")
    assert resumed.begin({0: rules[0], 1: rules[1]}, started={3}) == [2, 3]
    assert resumed.begin({pid: rules[pid] for pid in range(3)}, started=set()) == [3]  # the next wave at once
    # a trace task takes the trace target off the probes
    hutch = _policy("cluster.num_groups=1", "trace.rtol=1e-9", "density.tol=1e9", "trace.estimator=hutchpp")
    hutch.begin({}, started=set())
    assert hutch.finished({0: rules[0], 1: rules[1]}) == [] and hutch.decision.stopped == "converged"
