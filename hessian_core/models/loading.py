"""Loading a causal LM for analysis on one rank: pretrained from a local folder, a hub id or a DCP checkpoint, or
random weights from a config; the full load (the rank builds the whole model, then ``parallelize`` shards it),
the sharded load (``sharded``: each rank reads only its shards) and the choice between them; and what the
driver learns from a weightless build (block names, parameter count)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .build import build
from .config import checkpoint_format, hf_config
from .parallel import device_mesh, parallelize
from .sharded import load_sharded, read_plan
from .spec import DTYPES, ModelSpec


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """The whole model on CPU in eval mode with every parameter trainable (the caller moves and shards it)."""
    return build(spec, device="cpu")


def choose_loading(spec: ModelSpec, *, world_size: int) -> str:
    """``full`` or ``sharded`` for this spec on a group of ``world_size`` ranks.

    ``auto``: a DCP checkpoint always loads sharded (there is no other reader); a local safetensors folder
    loads sharded on 2+ ranks (each rank reads only its slices) and fully on one rank (the whole model is
    needed anyway, and Hugging Face's own loader is the reference); random weights, hub ids and .bin weights
    load fully. ``sharded`` on a source that cannot be read sharded is refused."""
    fmt = checkpoint_format(spec.path) if spec.init == "pretrained" else "random"
    readable = fmt in ("dcp", "safetensors")
    if spec.loading == "sharded" and not readable:
        raise ValueError(f"model.loading=sharded needs pretrained weights in a local safetensors or DCP folder; "
                         f"model.path {spec.path!r} is {fmt}: set model.loading=auto or full")
    if spec.loading == "full" and fmt == "dcp":
        raise ValueError(f"model.path {spec.path!r} is a DCP checkpoint, which only loads sharded: "
                         f"set model.loading=auto or sharded")
    if spec.loading != "auto":
        return spec.loading
    return "sharded" if fmt == "dcp" or (fmt == "safetensors" and world_size > 1) else "full"


def reads_sharded(spec: ModelSpec, *, world_size: int, problem: str | None) -> bool:
    """Whether the ranks read their own shards (``sharded``), given ``problem``, the sharded reader's objection
    to the checkpoint's keys (``read_plan``): a safetensors folder that the automatic choice would read sharded
    but whose keys only transformers' conversions map (fused experts) loads fully instead."""
    if choose_loading(spec, world_size=world_size) != "sharded":
        return False
    return problem is None or spec.loading == "sharded" or checkpoint_format(spec.path) == "dcp"


def load_for_rank(spec: ModelSpec, *, device: torch.device, world_size: int) -> tuple[torch.nn.Module, str]:
    """(model, how it was loaded) for one rank of a group: on ``device``, parallelized (FSDP2-sharded when
    ``world_size`` > 1 or for mixed precision: a process group must be initialised). A safetensors folder whose
    keys differ from the model's (e.g. a mixture-of-experts checkpoint that transformers 5 converts while
    loading) is loaded fully instead."""
    mesh = device_mesh(spec, device=device, world_size=world_size)
    how = choose_loading(spec, world_size=world_size)
    if how == "sharded":
        model = build(spec, device="meta")
        _, problem = read_plan(model, spec.path)
        if reads_sharded(spec, world_size=world_size, problem=problem):
            return load_sharded(spec, device=device, mesh=mesh, model=model), how
        how = "full (checkpoint keys differ from the model's: " + problem + ")"
    return parallelize(build(spec, device=device), spec, mesh), how


def import_model_code(spec: ModelSpec) -> None:
    """Import everything loading ``spec`` will run (transformers' modeling module of its architecture, DCP,
    safetensors), so that a measurement of the load (``actors.memory``) does not count the imports: they took
    ~140 MiB of a Ray worker's RSS on the 133k-parameter demo model."""
    import safetensors  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(hf_config(spec))]  # resolving the class imports its module
    except Exception:  # a bad config or an unreachable hub id: the load itself reports it, in full
        pass


def block_names(spec: ModelSpec) -> list[str]:
    """The model's blocks (hessian_core.parameter_blocks), from a weightless copy on the meta device: what the
    driver needs to queue per-block tasks before any rank has loaded the model."""
    from ..blocks import parameter_blocks
    from ..vectors import ParamSpace

    model = _weightless(spec)
    return list(parameter_blocks(model, ParamSpace(model)))


def parameter_count(spec: ModelSpec) -> int:
    """The parameters a group will analyse (``ParamSpace.numel``, tied weights once), counted on a weightless
    copy on the meta device: the driver records it before any rank loads the model, or without one at all."""
    from ..vectors import ParamSpace

    return ParamSpace(_weightless(spec)).numel


def _weightless(spec: ModelSpec) -> torch.nn.Module:
    """The model on the meta device, built in torch's default dtype with eager attention. Neither changes a
    parameter's name or size, and each matters here: a build in another dtype sets the process-wide default
    for its duration (a sweep's points ask from threads beside each other's work), and the driver that asks
    may lack the ranks' attention kernels (flash attention on a CPU head node)."""
    default = next((name for name, dtype in DTYPES.items() if dtype == torch.get_default_dtype()), "float32")
    return build(replace(spec, dtype=default, attn_implementation="eager"), device="meta")
