"""The masked causal-LM loss (labels with -100, padded batches) and its FD HVPs against a dense Hessian, also
from a pre-tokenized parquet file in the Hugging Face layout read by the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import VOCAB, flatten, make_batches, make_tiny_model, rel
from hessian_core import (FiniteDifferenceHVP, ParamSpace, analyze, causal_lm_loss, counted_tokens, evaluate_loss,
                          probe_vector)

PAD = 0
pytestmark = pytest.mark.xdist_group("masked_loss")  # with -n: the dense masked Hessian once, on one worker


def masked_batches() -> list[dict]:
    """Two batches with different numbers of counted tokens: prompt tokens (-100) and right padding."""
    ids = make_batches(num_batches=2, batch_size=2, seed=11)
    first_mask = torch.ones_like(ids[0])
    first_mask[1, 5:] = 0  # row 1 is 5 tokens long, padded
    first_ids = ids[0].masked_fill(first_mask == 0, PAD)
    first_labels = first_ids.clone()
    first_labels[0, :3] = -100  # a 3-token prompt
    second_labels = ids[1].clone()
    second_labels[:, :6] = -100  # only the last 2 tokens of each row count
    return [{"input_ids": first_ids, "attention_mask": first_mask, "labels": first_labels},
            {"input_ids": ids[1], "labels": second_labels}]


def reference_loss(model, batches) -> torch.Tensor:
    """The token mean over the whole set by gathering log-probabilities (independent of hessian_core.loss)."""
    total, count = 0.0, 0
    for b in batches:
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
        logp = F.log_softmax(model(input_ids=b["input_ids"], attention_mask=mask, use_cache=False).logits, dim=-1)
        targets = b["labels"][:, 1:]
        keep = (mask[:, 1:] == 1) & (targets != -100)
        picked = logp[:, :-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total = total - (picked * keep).sum()
        count += int(keep.sum())
    return total / count


def dense_masked_hessian(model, batches) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    class Bound(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = params

        def forward(self, **kwargs):
            return functional_call(model, self.params, args=(), kwargs=kwargs)

    def loss_of(theta):
        return reference_loss(Bound({n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}),
                              batches)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        # vectorized: 40x faster here; checked against a double-backward HVP below (the note of
        # helpers.dense_hessian on torch.func's asymmetric GPT-NeoX Hessian does not apply to this Llama: it is
        # symmetric to 1e-15)
        return torch.autograd.functional.hessian(loss_of, flat, vectorize=True)


def double_backward_hvp(model, batches, v: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(reference_loss(model, batches), params, create_graph=True)
        dot = (torch.cat([g.reshape(-1) for g in grads]) * v).sum()
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


@pytest.fixture(scope="module")
def llama_masked():
    model = make_tiny_model("llama")
    batches = masked_batches()
    hessian = dense_masked_hessian(model, batches)
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float((hessian - hessian.T).abs().max()) <= 1e-12 * float(hessian.abs().max())
    assert rel(hessian @ v, double_backward_hvp(model, batches, v)) <= 1e-12
    return model, batches, hessian


def test_counted_tokens_and_the_whole_set_mean(llama_masked):
    model, batches, _ = llama_masked
    assert [counted_tokens(b) for b in batches] == [5 + 4, 2 + 2]  # row 0: 7 targets - 2 prompt ones; row 1: 4 real
    space = ParamSpace(model)
    got = evaluate_loss(model, batches, space=space)
    with torch.no_grad():
        want = float(reference_loss(model, batches))
        mean_of_means = sum(float(causal_lm_loss(model, b)) for b in batches) / len(batches)
    assert abs(got - want) <= 1e-13 * abs(want)
    assert abs(mean_of_means - want) > 1e-3 * abs(want)  # the two definitions differ on this set


def test_masked_fd_hvp_equals_the_dense_masked_hessian(llama_masked):
    model, batches, hessian = llama_masked
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=1e-6, space=space)
    for k in range(2):
        v = probe_vector(space, seed=3, probe_index=k, dtype=torch.float64)
        assert rel(flatten(op.matvec(v)), hessian @ flatten(v)) <= 1e-7


def test_padding_content_is_invisible(llama_masked):
    model, batches, _ = llama_masked
    other = [dict(b) for b in batches]
    mask = other[0]["attention_mask"]
    other[0]["input_ids"] = other[0]["input_ids"].masked_fill(mask == 0, VOCAB - 1)
    space = ParamSpace(model)
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)
    a = FiniteDifferenceHVP(model, batches, eps=1e-6, space=space).matvec(v)
    b = FiniteDifferenceHVP(model, other, eps=1e-6, space=space).matvec(v)
    assert rel(flatten(a), flatten(b)) <= 1e-12


def test_a_set_without_counted_tokens_is_refused():
    model = make_tiny_model("llama", train_steps=0)
    ids = make_batches(num_batches=1, batch_size=1)[0]
    with pytest.raises(ValueError, match="no counted tokens"):
        FiniteDifferenceHVP(model, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], eps=1e-6)


def test_pretokenized_parquet_masks_and_labels_give_the_masked_dense_lambda_max(llama_masked, tmp_path):
    """input_ids + attention_mask (padding) + labels (-100 on prompt tokens) in a parquet file, read by the
    pipeline's preflight and sliced as a rank's batches: the analysed lambda_max is the masked Hessian's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hessian_core.loss import rank_batches
    from pipeline.run.config import load_config
    from pipeline.run.preflight import preflight
    from pipeline_fixtures import write_config

    model, batches, hessian = llama_masked
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for b in batches:
        b = {"attention_mask": torch.ones_like(b["input_ids"]), **b}
        for name, rows in columns.items():
            rows.extend(b[name].tolist())
    pq.write_table(pa.table(columns), tmp_path / "data.parquet")
    model.save_pretrained(tmp_path / "model")
    config = load_config(write_config(str(tmp_path / "c.yaml"), model=str(tmp_path / "model"),
                                      data=str(tmp_path / "data.parquet"), output_dir=str(tmp_path / "out")),
                         ["data.batch_size=2", "data.num_batches=2"])
    prepared = preflight(config)
    eig = torch.linalg.eigvalsh(hessian)
    result = analyze(model, rank_batches(prepared.batches, 0, 1), probes=1, steps=20, eps=1e-6, reorth="full")
    assert abs(result.lambda_max - float(eig[-1])) <= 1e-6 * float(eig[-1])  # 9e-11 here; 18.29 with the masks ignored
