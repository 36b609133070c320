"""Host offload (``lanczos.vectors: host``, ``hvp.restore: host``): the same bits as on the device, on CPU."""

import pytest
import torch

from conftest import make_batches, make_tiny_model
from hessian_core import FiniteDifferenceHVP, ParamSpace, lanczos, probe_vector
from hessian_core.lanczos import LanczosState, stream_rows


@pytest.fixture(scope="module")
def tiny():
    """A tiny float64 Llama, its batches, and its Lanczos run with everything on the device."""
    model = make_tiny_model("llama", train_steps=3)
    batches = make_batches(num_batches=1, batch_size=2, seed=7)
    return model, batches, _run(model, batches, vectors="device", restore="device")[1]


def _run(model, batches, *, vectors, restore, steps=8, state=None, on_step=None):
    op = FiniteDifferenceHVP(model, batches, eps=1e-4, restore=restore)
    v0 = None if state is not None else probe_vector(op.space, seed=0, probe_index=0, dtype=torch.float64)
    return op, lanczos(op.matvec, v0, space=op.space, steps=steps, reorth="window", window=4,
                       vector_dtype=torch.float64, vectors=vectors, state=state, on_step=on_step)


def test_host_vectors_and_host_restore_give_alpha_beta_bitwise_those_on_the_device(tiny):
    model, batches, device = tiny
    before = [p.detach().clone() for p in model.parameters()]
    op, host = _run(model, batches, vectors="host", restore="host")  # a window of 4: rows reused from step 4 on
    assert torch.equal(host.alphas, device.alphas) and torch.equal(host.betas, device.betas)
    assert host.steps == 8 and not torch.equal(host.alphas, host.alphas.roll(1))  # a real run, not constants
    # the host copy of the parameters is one buffer, and the parameters come back from it bit for bit
    backup = op._shared.backup
    assert all(t.untyped_storage().data_ptr() == backup[0].untyped_storage().data_ptr() for t in backup)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_host_window_is_one_host_matrix_streamed_through_a_device_row():
    space_holder = torch.nn.Module()
    space_holder.x = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    basis = [torch.full((6,), float(i)) .double() for i in range(3)]
    state = LanczosState.from_basis(basis, shapes=[torch.Size([6])], capacity=4, vectors="host")
    assert state.on_host and state.rows.shape == (4, 6) and torch.equal(state.newest, basis[-1])
    assert state.newest.data_ptr() != state.rows[2].data_ptr()  # the newest vector's own device copy
    streamed = [(r.data_ptr(), r.clone()) for r in stream_rows(state.rows, [0, 1], torch.device("cpu"))]
    assert streamed[0][0] == streamed[1][0]  # one device row, refilled
    assert all(r.data_ptr() != state.rows[i].data_ptr() for i, (_, r) in enumerate(streamed))
    assert [float(r[0]) for _, r in streamed] == [0.0, 1.0]
    state.push(torch.full((6,), 7.0, dtype=torch.float64), keep=3)
    assert state.order == [1, 2, 0] and float(state.rows[0, 0]) == 7.0 and float(state.newest[0]) == 7.0
    with pytest.raises(ValueError):
        LanczosState.from_basis(basis, shapes=[torch.Size([6])], vectors="disk")
    with pytest.raises(ValueError):
        FiniteDifferenceHVP(make_tiny_model("llama", train_steps=0), make_batches(num_batches=1, batch_size=1),
                            eps=1e-3, restore="disk")


def test_a_checkpoint_written_with_device_vectors_resumes_with_host_vectors_bitwise(tiny, tmp_path):
    from hessian_core import latest_complete_step, load_lanczos_state, save_lanczos_state

    model, batches, whole = tiny

    def save(state):
        if state.steps_done == 5:
            save_lanczos_state(state, folder=str(tmp_path), space=ParamSpace(model), meta={})

    _run(model, batches, vectors="device", restore="device", steps=6, on_step=save)
    step, _ = latest_complete_step(str(tmp_path))
    state = load_lanczos_state(str(tmp_path), step=step, space=ParamSpace(model), vectors="host")
    assert state.on_host
    _, resumed = _run(model, batches, vectors="host", restore="host", state=state)
    assert torch.equal(resumed.alphas, whole.alphas) and torch.equal(resumed.betas, whole.betas)


def test_a_rank_resumes_a_device_checkpoint_with_host_placement_bitwise(tmp_path):
    """The worker's own path (no Ray): a probe checkpointed with everything on the device and stopped at step 4
    continues with lanczos.vectors=host and hvp.restore=host to the alphas and betas of an uninterrupted run."""
    from actors.records import Placement, ProbeTask
    from actors.worker import Worker
    from hessian_core.models import ModelSpec

    worker = Worker(rank=0, world_size=1, use_gpu=False)
    spec = ModelSpec(path=None, init="random", dtype="float64", config_overrides={
        "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 16, "max_position_embeddings": 16})
    worker.setup(index=0, rendezvous=None, spec=spec, timeout_seconds=60,
                 batches=torch.randint(0, 32, (1, 2, 12), generator=torch.Generator().manual_seed(0)))

    def task(steps, placement, folder):
        return ProbeTask(probe_id=0, seed=0, eps=1e-4, scheme="central", steps=steps, reorth="window", window=3,
                         vector_dtype="float64", checkpoint_dir=str(folder) if folder else None,
                         checkpoint_every=1 if folder else 0, placement=placement)

    whole = worker.execute(task(8, Placement(), None))
    worker.execute(task(5, Placement(), tmp_path))  # its last checkpoint: step 4
    resumed = worker.execute(task(8, Placement(vectors="host", restore="host"), tmp_path))
    assert resumed.resumed_at_step == 4 and len(resumed.hvp_seconds) == 4
    assert resumed.alphas == whole.alphas and resumed.betas == whole.betas
    assert worker.op.restore == "host"


def test_the_placement_keys_are_validated_and_do_not_decide_the_results(tmp_path):
    from pipeline.run.config import ConfigError, load_config, results_part

    with pytest.raises(ConfigError, match="lanczos.vectors"):
        load_config(None, ["lanczos.vectors=disk"], check=False)
    with pytest.raises(ConfigError, match="hvp.restore"):
        load_config(None, ["hvp.restore=gpu"], check=False)
    host = load_config(None, ["lanczos.vectors=host", "hvp.restore=host"], check=False)
    assert (host.lanczos.vectors, host.hvp.restore) == ("host", "host")
    default = load_config(None, [], check=False)
    assert (default.lanczos.vectors, default.hvp.restore) == ("auto", "auto")
    # a run recorded before the keys existed, or with other placements, is the same run: it resumes
    old = default.to_dict()
    del old["lanczos"]["vectors"], old["hvp"]["restore"]
    assert results_part(old) == host.result_dict() == default.result_dict()
    assert host.digest() == default.digest()
    assert load_config(None, ["lanczos.window=4"], check=False).result_dict() != default.result_dict()


def test_the_run_takes_auto_from_the_plan_prints_it_once_and_records_it(tmp_path, capsys):
    from pipeline.run.config import load_config
    from pipeline.run.driver import _choose_placement
    from pipeline.run.plan import plan_run

    class Recorded:  # what the driver hands pipeline.run.recorder.Recorder.set_placement (run.json's placement)
        def set_placement(self, placement, *, auto, planned):
            self.args = (placement, auto, planned)

    path = tmp_path / "c.yaml"
    path.write_text("model: {init: random, dtype: float32, config: {model_type: llama, vocab_size: 64, hidden_size: 32,"
                    " num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 64}}\n"
                    "data: {path: builtin:demo, seq_len: 16, batch_size: 2}\n"
                    "cluster: {use_gpu: true, num_workers: 2}\nhvp: {restore: device}\n")
    config = load_config(str(path), this_machine=False)
    both_host = plan_run(config, device_bytes=1)  # nothing fits: auto takes the smallest peak (vectors on host)
    recorded = Recorded()
    _choose_placement(config, both_host, recorded)
    placement, auto, planned = recorded.args
    assert (placement.vectors, placement.restore, auto, planned) == ("host", "device", ["lanczos.vectors"], True)
    assert capsys.readouterr().err.count("placement: lanczos.vectors=host (auto), hvp.restore=device") == 1
    _choose_placement(config, None, recorded)  # no plan (a sweep's point): auto keeps them on the device
    assert (recorded.args[0].vectors, recorded.args[2]) == ("device", False)
