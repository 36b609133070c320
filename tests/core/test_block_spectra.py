"""Per-block spectra: SLQ of each diagonal block H_bb against the eigenvalues of the dense block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_batches, make_tiny_model
from hessian_core import (BlockOperator, FiniteDifferenceHVP, ParamSpace, block_space, block_spectrum,
                          parameter_blocks, probe_vector, ritz_rule)
from test_masked_loss import dense_masked_hessian

pytestmark = pytest.mark.slow  # Ray, subprocess runs or simulated clusters: outside `-m "not slow"`


@pytest.fixture(scope="module")
def llama_blocks():
    model = make_tiny_model("llama")
    ids = make_batches(num_batches=2, batch_size=2, seed=7)
    batches = [{"input_ids": b, "labels": b} for b in ids]  # the plain loss, through the masked reference
    return model, batches, dense_masked_hessian(model, batches)


def dense_block(model, hessian, space, idx) -> torch.Tensor:
    starts = np.cumsum([0] + [p.numel() for p in space.params])
    sel = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx])
    return hessian[sel][:, sel]


def test_block_operator_is_the_dense_block(llama_blocks):
    model, batches, hessian = llama_blocks
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=1e-6, space=space)
    idx = parameter_blocks(model, space)["model.layers.0"]
    sub = block_space(space, idx)
    assert sub.names == [space.names[i] for i in idx] and sub.numel == sum(space.params[i].numel() for i in idx)
    v = probe_vector(sub, seed=1, probe_index=0, dtype=torch.float64)
    got = torch.cat([t.reshape(-1) for t in BlockOperator(op.matvec, num_params=len(space.params), indices=idx)(v)])
    want = dense_block(model, hessian, space, idx) @ torch.cat([t.reshape(-1) for t in v])
    assert float((got - want).norm() / want.norm()) <= 1e-8


def test_each_block_ritz_values_are_the_dense_block_eigenvalues(llama_blocks):
    """m = block size, full reorthogonalization, float64: every Ritz value is an eigenvalue of the dense H_bb and
    every eigenvalue is found (an invariant subspace may end Lanczos early when eigenvalues repeat: the
    embedding rows of tokens absent from the data give a multiple eigenvalue 0)."""
    model, batches, hessian = llama_blocks
    space = ParamSpace(model)
    op = FiniteDifferenceHVP(model, batches, eps=1e-6, space=space)
    worst = {}
    for name, idx in parameter_blocks(model, space).items():
        eig = torch.linalg.eigvalsh(dense_block(model, hessian, space, idx)).numpy()
        run = block_spectrum(op.matvec, space=space, indices=idx, probe_id=0, seed=0, steps=len(eig), reorth="full")
        values = ritz_rule(run.alphas, run.betas).values
        worst[name] = max(max(np.abs(eig - r).min() for r in values), max(np.abs(values - e).min() for e in eig))
    assert set(worst) == {"model.embed_tokens", "model.layers.0", "model.norm", "lm_head"}
    assert max(worst.values()) <= 1e-8, worst


def test_analyze_block_spectra_match_the_dense_blocks(llama_blocks):
    model, batches, hessian = llama_blocks
    from hessian_core import analyze

    result = analyze(model, batches, probes=1, steps=8, eps=1e-6, reorth="full", block_spectra=True, block_steps=8)
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    assert list(result.block_ritz) == list(blocks)
    norm = dense_block(model, hessian, space, blocks["model.norm"])  # 8 parameters: resolved entirely in 8 steps
    eig = torch.linalg.eigvalsh(norm).numpy()
    assert np.abs(np.sort(result.block_ritz["model.norm"][0].values) - eig).max() <= 1e-8
    table = result.block_ritz_arrow()
    assert table.column_names == ["block", "probe_id", "value", "weight", "block_size"]
    assert dict(zip(table.column("block").to_pylist(), table.column("block_size").to_pylist()))["lm_head"] == 256
