"""Block-diagonal metrics against the same quantities computed from the dense Hessian."""

import numpy as np
import pytest
import torch

from helpers import flatten
from hessian_core import FiniteDifferenceHVP, ParamSpace, block_diagonal_metrics, parameter_blocks, probe_vector


def test_gpt_neox_blocks_are_layers_and_outside_modules():
    from helpers import make_tiny_model

    model = make_tiny_model("gpt_neox", train_steps=0, layers=2)
    blocks = parameter_blocks(model, ParamSpace(model))
    assert list(blocks) == ["gpt_neox.embed_in", "gpt_neox.layers.0", "gpt_neox.layers.1",
                            "gpt_neox.final_layer_norm", "lm_head"]
    assert sorted(i for idx in blocks.values() for i in idx) == list(range(len(ParamSpace(model).params)))


@pytest.mark.slow
def test_block_metrics_equal_dense_hessian_values(tiny_f64):
    _, model, batches, hessian = tiny_f64
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    v = probe_vector(space, seed=5, probe_index=0, dtype=torch.float64)
    op = FiniteDifferenceHVP(model, batches, eps=1e-5)
    got = block_diagonal_metrics(op.matvec, v, space=space, blocks=blocks)

    sizes = [p.numel() for p in space.params]
    starts = np.cumsum([0] + sizes)
    flat_v = flatten(v)
    h = hessian @ flat_v
    approx = torch.zeros_like(h)
    for k, idx in enumerate(blocks.values()):
        mask = torch.zeros_like(flat_v, dtype=torch.bool)
        for i in idx:
            mask[starts[i]:starts[i + 1]] = True
        hb = hessian @ torch.where(mask, flat_v, 0.0)
        a, b = h[mask], hb[mask]
        approx[mask] = b
        assert abs(got.rel_error[k] - float((a - b).norm() / a.norm())) <= 1e-8
        assert abs(got.cosine[k] - float(a @ b / (a.norm() * b.norm()))) <= 1e-8
    assert abs(got.whole_rel_error - float((approx - h).norm() / h.norm())) <= 1e-8
    assert got.whole_rel_error > 0.01  # the tiny models do couple their blocks
