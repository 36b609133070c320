"""Sharded loading (meta build, fully_shard, each rank reads its slices) against the full load: parameters and
buffers bitwise, HVPs and Lanczos coefficients; DCP checkpoints written by an FSDP2 training loop; tied
embeddings against the dense Hessian; key checks; the automatic choice of path; load memory."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from actors.worker import free_port
from helpers import dense_hessian, flatten, make_batches, rel, tiny_config
from hessian_core import FiniteDifferenceHVP, ParamSpace, parameter_blocks, probe_vector
from hessian_core.models import ModelSpec, check_checkpoint, choose_loading, load_for_rank, load_model
from hessian_core.models.sharded import load_sharded
from loading_worker import HVP_EPS, compare_loads, finetune_and_save, global_batches, hvp_of_loads

CPU = torch.device("cpu")


def save_tiny(path, arch: str = "llama", *, tie: bool = False, hidden: int = 16, layers: int = 2,
              shard_size: str | None = "8KB") -> str:
    """A random-weight tiny model saved with save_pretrained, index-sharded into several files by default."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if arch == "qwen3":
        config = Qwen3Config(vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=hidden // 2, intermediate_size=2 * hidden,
                             max_position_embeddings=64, tie_word_embeddings=tie)
    else:
        config = tiny_config(arch, hidden=hidden, layers=layers)
        config.tie_word_embeddings = tie
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def assemble(rank_parts: list[dict], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Whole flat tensors from each rank's {name: (flat_start, local shard)}."""
    out = {name: torch.full((n,), float("nan"), dtype=torch.float64) for name, n in sizes.items()}
    for part in rank_parts:
        for name, (start, t) in part.items():
            out[name][start:start + t.numel()] = t.to(torch.float64)
    return out


def spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


# -- meta build + sharded read against the full load -----------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_one_rank_sharded_load_equals_full_load_bitwise(arch, tmp_path):
    path = save_tiny(tmp_path / "m", arch)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 2
    batch = make_batches(num_batches=1, batch_size=2, seed=3)[0]
    for dtype in ("float32", "float64"):
        spec = ModelSpec(path=path, dtype=dtype)
        full, sharded = load_model(spec), load_sharded(spec, device=CPU)
        fp, sp = dict(full.named_parameters()), dict(sharded.named_parameters())
        assert list(fp) == list(sp) and all(torch.equal(fp[k], sp[k]) and fp[k].dtype == sp[k].dtype for k in fp)
        fb, sb = dict(full.named_buffers()), dict(sharded.named_buffers())
        assert any("inv_freq" in k for k in fb)  # the non-persistent rotary buffers a meta build would lose
        assert list(fb) == list(sb) and all(torch.equal(fb[k], sb[k]) and fb[k].dtype == sb[k].dtype for k in fb)
        with torch.no_grad():
            assert torch.equal(full(input_ids=batch).logits, sharded(input_ids=batch).logits)


@pytest.mark.slow
def test_two_rank_sharded_load_equals_full_load(tmp_path):
    """Shards bitwise (float32, float64); float64 HVP and alpha/beta equal to <= 1e-12 (they are identical)."""
    path = save_tiny(tmp_path / "m", "llama")
    spawn(compare_loads, 2, path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"compare-rank{r}.pt") for r in range(2)]
    for dtype in ("float32", "float64"):
        for r in ranks:
            full, sharded = r[dtype]["full"], r[dtype]["sharded"]
            assert list(full["params"]) == list(sharded["params"])
            for name, (start, t) in full["params"].items():
                s_start, s = sharded["params"][name]
                assert start == s_start and torch.equal(t, s) and t.dtype == s.dtype
            assert all(torch.equal(full["buffers"][k], sharded["buffers"][k]) for k in full["buffers"])
        # the two ranks hold disjoint halves: together they cover every element of every parameter
        sizes = {n: ranks[0][dtype]["full"]["params"][n][1].numel() + ranks[1][dtype]["full"]["params"][n][1].numel()
                 for n in ranks[0][dtype]["full"]["params"]}
        whole = assemble([r[dtype]["sharded"]["params"] for r in ranks], sizes)
        assert all(not t.isnan().any() for t in whole.values())
        assert max(r[dtype]["sharded"]["params"][n][1].numel() for r in ranks for n in sizes) < max(sizes.values())
    for r in ranks:
        a, b = r["run_full"], r["run_sharded"]
        assert rel(b["alphas"], a["alphas"]) <= 1e-12 and rel(b["betas"], a["betas"]) <= 1e-12
        for name, (_, t) in a["hv"].items():
            assert rel(b["hv"][name][1], t) <= 1e-12


# -- DCP checkpoints from an FSDP2 training loop ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(folder with dcp-flat, dcp-nested and hf, the HF config folder) after 4 FSDP2 steps on 2 ranks."""
    root = tmp_path_factory.mktemp("finetuned")
    config_dir = save_tiny(root / "config-src", "llama", shard_size=None)
    spawn(finetune_and_save, 2, config_dir, str(root))
    return root, config_dir


@pytest.mark.slow
def test_dcp_checkpoint_loads_at_any_world_size_with_the_hf_folders_hvps(finetuned, tmp_path):
    root, config_dir = finetuned
    specs = {"hf": ModelSpec(path=str(root / "hf"), dtype="float64"),
             "dcp": ModelSpec(path=str(root / "dcp-flat"), config_path=config_dir, dtype="float64"),
             "dcp-nested": ModelSpec(path=str(root / "dcp-nested"), config_path=config_dir, dtype="float64")}
    hvp_of_loads(0, 1, 0, specs, str(tmp_path))  # one rank, in this process: the DCP written by 2 ranks, resharded
    one = torch.load(tmp_path / "hvp-w1-rank0.pt")
    assert one["hf"]["how"] == "full" and one["dcp"]["how"] == "sharded"
    for name in ("dcp", "dcp-nested"):
        for p, (_, t) in one["hf"]["hv"].items():
            assert rel(one[name]["hv"][p][1], t) <= 1e-12
        assert rel(one[name]["alphas"], one["hf"]["alphas"]) <= 1e-12
    spawn(hvp_of_loads, 2, {k: specs[k] for k in ("hf", "dcp")}, str(tmp_path))
    two = [torch.load(tmp_path / f"hvp-w2-rank{r}.pt") for r in range(2)]
    assert all(r["hf"]["how"] == "sharded" and r["dcp"]["how"] == "sharded" for r in two)
    for r in two:
        for p, (_, t) in r["hf"]["hv"].items():
            assert rel(r["dcp"]["hv"][p][1], t) <= 1e-12
        assert rel(r["dcp"]["alphas"], r["hf"]["alphas"]) <= 1e-12
    # and the 2-rank run is the 1-rank run (up to the reduction order of 2 ranks)
    assert rel(two[0]["dcp"]["alphas"], one["dcp"]["alphas"]) <= 1e-8


@pytest.mark.slow
def test_dcp_key_mismatch_is_refused_in_one_line_naming_the_key(finetuned, tmp_path):
    import torch.distributed.checkpoint as dcp

    root, config_dir = finetuned
    check_checkpoint(ModelSpec(path=str(root / "dcp-flat"), config_path=config_dir))  # the good one passes
    check_checkpoint(ModelSpec(path=str(root / "dcp-nested"), config_path=config_dir))
    state = load_model(ModelSpec(path=str(root / "hf"))).state_dict()
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    extra = {**state, "model.layers.0.mlp.bonus.weight": torch.zeros(2)}
    for name, sd, needle in (("missing", missing, "has no key 'model.norm.weight'"),
                             ("extra", extra, "unexpected key 'model.layers.0.mlp.bonus.weight'")):
        dcp.save(sd, checkpoint_id=str(tmp_path / name), no_dist=True)
        spec = ModelSpec(path=str(tmp_path / name), config_path=config_dir)
        with pytest.raises(ValueError) as err:
            check_checkpoint(spec)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model.config_path"):
        check_checkpoint(ModelSpec(path=str(root / "dcp-flat")))  # no architecture given


def test_checkpoint_check_follows_the_path_that_will_read_it(tmp_path):
    """The preflight's key check accepts what each path reads: a tied lm_head present or absent, keys that
    transformers drops while loading, a mixture-of-experts checkpoint whose experts transformers 5 fuses (the
    full load; refused where model.loading=sharded asks the sharded reader for it). A key of no parameter is
    refused by name on the full path too."""
    import transformers
    from safetensors.torch import load_file, save_file
    from test_moe import save_moe
    from transformers import AutoModelForCausalLM

    tied = save_tiny(tmp_path / "tied", "qwen3", tie=True, hidden=4, layers=1, shard_size=None)
    weights = os.path.join(tied, "model.safetensors")
    state = load_file(weights)
    assert "lm_head.weight" not in state  # save_pretrained drops the tied alias
    moe = save_moe(tmp_path / "moe", "mixtral", layers=1)
    for world in (1, 2):
        check_checkpoint(ModelSpec(path=tied), world_size=world)
        check_checkpoint(ModelSpec(path=moe), world_size=world)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone(),
               "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(1)}, weights, metadata={"format": "pt"})
    for loading in ("full", "sharded"):
        check_checkpoint(ModelSpec(path=tied, loading=loading))
    save_file({**state, "model.layers.0.mlp.bonus.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected key 'model.layers.0.mlp.bonus.weight'"):
        check_checkpoint(ModelSpec(path=tied, loading="full"))
    gpt2 = _gpt2_base_layout(tmp_path / "gpt2")
    _, info = AutoModelForCausalLM.from_pretrained(gpt2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # what the check must accept
    check_checkpoint(ModelSpec(path=gpt2))
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 4 keeps the experts unfused: no conversion
        with pytest.raises(ValueError, match="set model.loading=auto"):
            check_checkpoint(ModelSpec(path=moe, loading="sharded"))


def test_full_load_refuses_a_missing_tensor_itself(tmp_path):
    """Where the preflight cannot read the keys (a hub id, .bin weights), the full load still refuses to leave
    a missing tensor randomly initialised."""
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "m", "llama", hidden=4, layers=1, shard_size=None)
    weights = os.path.join(path, "model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if k != "model.norm.weight"}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no tensor 'model.norm.weight'"):
        load_model(ModelSpec(path=path))


def _gpt2_base_layout(path) -> str:
    """A tiny tied GPT-2 saved as the hub's GPT-2 is: keys without `transformer.`, and the causal-mask buffers
    `h.N.attn.bias` that older transformers saved."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in load_file(weights).items()}
    save_file({**state, "h.0.attn.bias": torch.ones(1, 1, 16, 16)}, weights, metadata={"format": "pt"})
    return str(path)


# -- tied embeddings ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tied_qwen3_survives_meta_build_and_sharding(tmp_path):
    """FD HVP of the sharded-loaded tied model (1 and 2 ranks) against the dense Hessian; unique count."""
    path = save_tiny(tmp_path / "m", "qwen3", tie=True, hidden=4, layers=1, shard_size=None)  # 288 parameters
    spec = ModelSpec(path=path, dtype="float64", loading="sharded")
    model = load_sharded(spec, device=CPU)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    space = ParamSpace(model)
    assert space.numel == sum(unique.values()) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert "lm_head" not in parameter_blocks(model, space) and "model.embed_tokens" in parameter_blocks(model, space)

    batches = global_batches()
    hessian = dense_hessian(load_model(spec), batches)  # ~40 s on a busy 2-core machine
    v = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)
    hv = FiniteDifferenceHVP(model, batches, eps=HVP_EPS, space=space).matvec(v)
    assert rel(flatten(hv), hessian @ flatten(v)) <= 1e-7

    spawn(hvp_of_loads, 2, {"tied": spec}, str(tmp_path))
    two = [torch.load(tmp_path / f"hvp-w2-rank{r}.pt")["tied"] for r in range(2)]
    sizes = {s.name: s.global_shape.numel() for s in space.shards}
    hv2 = assemble([r["hv"] for r in two], sizes)
    v2 = probe_vector(space, seed=3, probe_index=0, dtype=torch.float64)  # probes do not depend on sharding
    got = torch.cat([hv2[s.name] for s in space.shards])
    assert two[0]["num_params"] == space.numel and two[0]["blocks"] == list(parameter_blocks(model, space))
    assert rel(got, hessian @ flatten(v2)) <= 1e-7


# -- the choice of path and its checks ------------------------------------------------------------------------

def test_loading_is_chosen_automatically_and_bad_choices_are_refused(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", shard_size=None)
    assert choose_loading(ModelSpec(path=path), world_size=1) == "full"
    assert choose_loading(ModelSpec(path=path), world_size=2) == "sharded"
    assert choose_loading(ModelSpec(path=path, loading="sharded"), world_size=1) == "sharded"
    assert choose_loading(ModelSpec(path=None, init="random", config_overrides={"model_type": "llama"}),
                          world_size=4) == "full"
    with pytest.raises(ValueError, match="model.loading=sharded"):
        choose_loading(ModelSpec(path=None, init="random", loading="sharded"), world_size=2)
    model, how = load_for_rank(ModelSpec(path=path, loading="sharded"), device=CPU, world_size=1)
    assert how == "sharded" and not any(p.is_meta for p in model.parameters())


def test_hf_renamed_keys_are_read_under_their_stored_names(tmp_path):
    """transformers 5 stores GPT-NeoX's lm_head as embed_out.weight: the sharded read follows the rename
    (on transformers 4 the module itself is called embed_out)."""
    path = save_tiny(tmp_path / "m", "gpt_neox", shard_size=None)
    model, how = load_for_rank(ModelSpec(path=path, dtype="float64", loading="sharded"), device=CPU, world_size=1)
    full = load_model(ModelSpec(path=path, dtype="float64"))
    out, ref = model.get_output_embeddings().weight, full.get_output_embeddings().weight  # embed_out on transformers 4
    assert how == "sharded" and torch.equal(out, ref)


# -- load memory ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_load_grows_each_rank_by_its_half_only(tmp_path):
    """bench/load_memory.py's ranks on a 29M-parameter Llama (116 MB in 2 files): each rank's peak RSS growth
    while loading sharded is its half of the float32 bytes plus a fixed overhead (measured 12 MiB at 102M
    parameters), and below the full load's peak (every rank reads the whole model first)."""
    import json
    import sys

    bench_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")
    sys.path.insert(0, bench_dir)  # spawned ranks too
    import load_memory as bench

    folder = str(tmp_path / "model")
    numel = bench.build_and_save(folder, hidden=512, layers=4, vocab=16000, shard_size="80MB")
    mib = numel * 4 / 2**20
    growth = {}
    for loading in ("full", "sharded"):
        mp.spawn(bench.rank_main, args=(2, free_port(), folder, loading, str(tmp_path)), nprocs=2, join=True)
        rows = [json.load(open(tmp_path / f"{loading}-rank{r}.json")) for r in range(2)]
        assert all(r["loading"] == loading for r in rows) and all(r["method"].startswith("VmHWM") for r in rows)
        growth[loading] = max(r["peak_growth_mib"] for r in rows)
    assert growth["sharded"] <= 0.5 * mib + 24, (growth, mib)
    assert growth["sharded"] < growth["full"], (growth, mib)
