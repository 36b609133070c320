"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): FSDP2 blocks and block-analysis names are the decoder layers the model declares
(``_no_split_modules``), never its experts, and the FD HVP matches the dense Hessian.

Top-k routing makes the loss non-smooth where two router logits tie (a measure-zero set): a finite difference
whose step crosses such a tie would differ from the Hessian there. With random weights and a 1e-6 step the
chance of that is negligible, and the checks below are exact comparisons, not statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actors.worker import free_port
from helpers import dense_hessian, flatten, make_batches, rel
from hessian_core import FiniteDifferenceHVP, ParamSpace, parameter_blocks, probe_vector
from hessian_core.sharding import transformer_blocks
from loading_worker import wrapped_modules

MOE_VOCAB = 8


def moe_config(kind: str, *, layers: int, hidden: int = 4, experts: int = 4):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=MOE_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
                  num_experts_per_tok=2, attn_implementation="sdpa")
    if kind == "mixtral":
        return MixtralConfig(**common, intermediate_size=2, num_local_experts=experts)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(**common, intermediate_size=2, moe_intermediate_size=2,
                              shared_expert_intermediate_size=2, num_experts=experts)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=hidden // 2, intermediate_size=2, moe_intermediate_size=2,
                              num_experts=experts)
    raise ValueError(kind)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))


class _Model(nn.Module):
    """Two layers of eight experts each: the largest repeated ModuleList is the experts."""

    _no_split_modules = ["_Layer"]

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(2))


def test_declared_blocks_win_over_a_longer_expert_list():
    model = _Model()
    assert [path for path, _ in transformer_blocks(model)] == ["layers.0", "layers.1"]
    model.layers[1].__class__ = type("FSDP_Layer", (_Layer,), {})  # what fully_shard does to a module's class
    assert [path for path, _ in transformer_blocks(model)] == ["layers.0", "layers.1"]
    model._no_split_modules = None  # the fallback rule alone would split per expert (transformers 4's layout)
    assert [path for path, _ in transformer_blocks(model)] == [f"layers.0.experts.{i}" for i in range(8)]


def save_moe(path, kind: str, *, layers: int) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config(kind, layers=layers)).save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
def test_moe_models_are_sharded_and_named_per_decoder_layer(tmp_path):
    """Loaded as a worker loads them, on 2 ranks: sharded reads where the checkpoint keys are the model's
    (transformers 4), the full load where transformers 5 fuses the experts while loading."""
    import torch.multiprocessing as mp

    from hessian_core.models import ModelSpec

    specs = {kind: ModelSpec(path=save_moe(tmp_path / kind, kind, layers=2), dtype="float64")
             for kind in ("mixtral", "qwen2_moe", "qwen3_moe")}
    mp.spawn(wrapped_modules, args=(2, free_port(), specs, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"wrapped-rank{rank}.pt")
        for kind in specs:
            assert got[kind]["wrapped"] == ["", "model.layers.0", "model.layers.1"]
            assert got[kind]["blocks"] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
                                           "lm_head"]
            assert got[kind]["how"] == "sharded" or got[kind]["how"].startswith("full (checkpoint keys differ")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_fd_hvp_matches_the_dense_hessian(kind, tmp_path):
    from hessian_core.models import ModelSpec, load_model

    model = load_model(ModelSpec(path=save_moe(tmp_path / kind, kind, layers=1), dtype="float64"))
    batches = make_batches(num_batches=1, batch_size=4, seq_len=6, vocab=MOE_VOCAB, seed=7)
    space = ParamSpace(model)
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)
    hv = FiniteDifferenceHVP(model, batches, eps=1e-6, space=space).matvec(v)
    hessian = dense_hessian(model, batches)
    assert rel(flatten(hv), hessian @ flatten(v)) <= 1e-6
    assert any("experts" in name for name in space.names)
    assert list(parameter_blocks(model, space)) == ["model.embed_tokens", "model.layers.0", "model.norm", "lm_head"]
