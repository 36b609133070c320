"""A new kind of task, defined here and in no module of the package: the analysis loss at theta + t*v along SLQ
probe 0's start vector v. Its record runs itself on the ranks, its handler is registered here, and it runs on a
real 2-rank group (FSDP2 shards) through the package's own scheduler on the local Ray."""

from dataclasses import dataclass

import pytest
import torch

from actors.tasks import TaskRecord
from hessian_core import ParamSpace, evaluate_loss, probe_vector
from hessian_core.loss import rank_batches
from pipeline_fixtures import assets, write_config

pytestmark = [pytest.mark.usefixtures("shared_ray"), pytest.mark.xdist_group("task_protocol")]

SEED = 5
SHIFTS = (0.0, 0.3, -1.0)


def shifted_loss(model, batches, space: ParamSpace, *, t: float, seed: int) -> float:
    """The loss at theta + t*v (v: probe 0's Rademacher start vector), the parameters restored after."""
    params = space.local_params()
    v = probe_vector(space, seed=seed, probe_index=0, dtype=params[0].dtype)
    backup = [p.clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=t)
    try:
        return evaluate_loss(model, batches, space=space)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)


@dataclass(frozen=True, kw_only=True)
class ShiftedLoss:
    t: float
    loss: float
    world_size: int
    sharded: bool


@dataclass(frozen=True, kw_only=True)
class ShiftedLossTask(TaskRecord):
    t: float
    seed: int

    @property
    def label(self) -> str:
        return f"loss at t={self.t:g}"

    def run(self, ctx) -> ShiftedLoss:
        loss = shifted_loss(ctx.model, ctx.batches, ctx.space, t=self.t, seed=self.seed)
        return ShiftedLoss(t=self.t, loss=loss, world_size=ctx.world_size, sharded=ctx.space.sharded)


def test_a_task_type_from_outside_the_package_runs_on_a_two_rank_group(tmp_path):
    import sys

    import ray

    from hessian_core.models import load_model
    from pipeline.run import handlers
    from pipeline.run.config import load_config
    from pipeline.run.driver import ray_scheduler
    from pipeline.run.preflight import model_spec, preflight
    from pipeline.run.recorder import Recorder

    model, data = assets(str(tmp_path))
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=str(tmp_path / "run"),
                       cluster={"num_workers": 2, "num_groups": 1})
    prepared = preflight(load_config(cfg))
    got, groups = {}, set()

    def finished(run, task, result, group):
        assert task.label not in got, f"{task.label} finished twice"
        got[task.label] = result
        groups.add(group)

    handlers.register(ShiftedLossTask, finished=finished)
    # the ranks cannot import this test module: its classes travel by value (as a script's own classes do)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        scheduler = ray_scheduler(prepared, Recorder(prepared), batches_ref=ray.put(prepared.batches))
        scheduler.submit([ShiftedLossTask(t=t, seed=SEED) for t in SHIFTS])
        try:
            scheduler.run()
        finally:
            scheduler.shutdown(graceful=True)
    finally:
        del handlers.HANDLERS[ShiftedLossTask]
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    whole = load_model(model_spec(prepared))  # one process, the model unsharded, every batch
    reference = {t: shifted_loss(whole, rank_batches(prepared.batches, 0, 1), ParamSpace(whole), t=t, seed=SEED)
                 for t in SHIFTS}
    assert sorted(got) == sorted(f"loss at t={t:g}" for t in SHIFTS) and groups == {0}
    for t in SHIFTS:
        result = got[f"loss at t={t:g}"]
        assert result.world_size == 2 and result.sharded and result.t == t
        assert result.loss == pytest.approx(reference[t], rel=1e-10, abs=0), t
    assert len({round(r, 6) for r in reference.values()}) == len(SHIFTS)  # the shift changes the loss


def test_a_task_without_a_registered_handler_is_refused_by_type():
    from pipeline.run.handlers import UnhandledTask, handler_for

    with pytest.raises(UnhandledTask):
        handler_for(ShiftedLossTask(t=0.0, seed=0))
