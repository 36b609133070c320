"""Loading a causal LM for analysis: pretrained from a local folder, a hub id or a DCP checkpoint, or random
weights from a config; the full load (every rank holds the whole model, then shards it) and the choice between
it and the sharded load of ``actors.sharded_loading``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from hessian_core import float64_numerics

# transformers builds a model under a process-wide torch default dtype that it sets and restores: two builds in
# threads of one process (the driver's plan trace, a sweep's points) can leave it changed for good, and every
# later tensor with it. Every build from a config in this package and in pipeline/ holds this lock.
BUILD_LOCK = threading.Lock()
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What each rank needs to build the same model."""

    path: str | None
    revision: str | None = None
    init: str = "pretrained"  # pretrained | random
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    config_overrides: dict = field(default_factory=dict)  # HF config kwargs (random init without a path)
    seed: int = 0  # random init
    config_path: str | None = None  # HF config folder for the architecture (a DCP model.path has none)
    loading: str = "auto"  # auto | full | sharded (see choose_loading)
    compute_dtype: str | None = None  # forward/backward dtype (None: dtype); see hessian_core.precision
    activation_checkpointing: bool = False  # recompute each transformer block in the backward


def hf_kwargs(spec: ModelSpec) -> dict:
    """Keyword arguments for ``from_pretrained`` / ``from_config``: dtype, attention, and on transformers 5 the
    mixture-of-experts kernel: its default ``grouped_mm`` has no float64, so float64 uses the eager loop."""
    from transformers import PretrainedConfig

    kwargs = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation}
    if spec.dtype == "float64" and hasattr(PretrainedConfig(), "_experts_implementation"):
        kwargs["experts_implementation"] = "eager"
    return kwargs


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model on CPU in eval mode with every parameter trainable (the caller moves and shards it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank would drown the driver's progress output
    if spec.init == "random":
        if spec.path:
            config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, **spec.config_overrides)
        else:
            overrides = dict(spec.config_overrides)
            config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
        torch.manual_seed(spec.seed)  # every rank draws the same weights
        with BUILD_LOCK:
            model = AutoModelForCausalLM.from_config(config, **hf_kwargs(spec))
    else:
        model, info = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, output_loading_info=True,
                                                           **hf_kwargs(spec))
        if info["missing_keys"]:  # left randomly initialised; the preflight refuses this for local folders it reads
            raise ValueError(f"model.path {spec.path!r} has no tensor {sorted(info['missing_keys'])[0]!r} "
                             f"({len(info['missing_keys'])} missing): from_pretrained would leave it random")
    return prepare_for_analysis(model)


def prepare_for_analysis(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (dropout off), every parameter trainable, float64 norms, routers and attention kept in float64
    (``hessian_core.numerics``, the same fixes ``analyze`` applies)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    float64_numerics(model)  # for good: the model exists only for the analysis
    return model


def choose_loading(spec: ModelSpec, *, world_size: int) -> str:
    """``full`` or ``sharded`` for this spec on a group of ``world_size`` ranks.

    ``auto``: a DCP checkpoint always loads sharded (there is no other reader); a local safetensors folder
    loads sharded on 2+ ranks (each rank reads only its slices) and fully on one rank (the whole model is
    needed anyway, and Hugging Face's own loader is the reference); random weights, hub ids and .bin weights
    load fully. ``sharded`` on a source that cannot be read sharded is refused."""
    from .sharded_loading import checkpoint_format

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
    """Whether the ranks read their own shards (``actors.sharded_loading``), given ``problem``, the sharded
    reader's objection to the checkpoint's keys (``read_plan``): a safetensors folder that the automatic choice
    would read sharded but whose keys only transformers' conversions map (fused experts) loads fully instead."""
    from .sharded_loading import checkpoint_format

    if choose_loading(spec, world_size=world_size) != "sharded":
        return False
    return problem is None or spec.loading == "sharded" or checkpoint_format(spec.path) == "dcp"


def load_for_rank(spec: ModelSpec, *, device: torch.device, world_size: int) -> tuple[torch.nn.Module, str]:
    """(model, how it was loaded) for one rank of a group: on ``device``, FSDP2-sharded when ``world_size`` > 1
    (a process group must be initialised). A safetensors folder whose keys differ from the model's (e.g.
    a mixture-of-experts checkpoint that transformers 5 converts while loading) is loaded fully instead."""
    from hessian_core import shard_model

    from .sharded_loading import build_on_meta, load_sharded, read_plan

    mesh = None
    if world_size > 1 or sharding_options(spec)["mp_policy"] is not None:  # mixed precision: FSDP2 even on 1 rank
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size,))
    how = choose_loading(spec, world_size=world_size)
    model = None
    if how == "sharded":
        model = build_on_meta(spec)
        _, problem = read_plan(model, spec.path)
        if reads_sharded(spec, world_size=world_size, problem=problem):
            model = load_sharded(spec, device=device, mesh=mesh, model=model)
        else:
            model, how = None, "full (checkpoint keys differ from the model's: " + problem + ")"
    if model is None:
        model = load_model(spec).to(device)
        if mesh is not None:
            shard_model(model, mesh=mesh, **sharding_options(spec))
    if mesh is None and spec.activation_checkpointing:
        from hessian_core.precision import checkpoint_blocks

        checkpoint_blocks(model)
    return model, how


def sharding_options(spec: ModelSpec) -> dict:
    """``shard_model``'s precision keywords for ``spec``: FSDP2 mixed precision when ``compute_dtype`` is lower
    than ``dtype``, and activation checkpointing (hessian_core.precision)."""
    from hessian_core.precision import mixed_precision_policy

    return {"mp_policy": mixed_precision_policy(DTYPES[spec.dtype], DTYPES[spec.compute_dtype or spec.dtype]),
            "activation_checkpointing": spec.activation_checkpointing}


def import_model_code(spec: ModelSpec) -> None:
    """Import everything loading ``spec`` will run (transformers' modeling module of its architecture, DCP,
    safetensors), so that a measurement of the load (``actors.memory``) does not count the imports: they took
    ~140 MiB of a Ray worker's RSS on the 133k-parameter demo model."""
    import safetensors  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    from transformers import AutoModelForCausalLM

    from .sharded_loading import model_config

    try:
        if spec.init == "random" and not spec.path:
            from transformers import AutoConfig

            overrides = dict(spec.config_overrides)
            config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
        else:
            config = model_config(spec)
        AutoModelForCausalLM._model_mapping[type(config)]  # resolving the class imports its module
    except Exception:  # a bad config or an unreachable hub id: the load itself reports it, in full
        pass


def block_names(spec: ModelSpec) -> list[str]:
    """The model's blocks (hessian_core.parameter_blocks), from a weightless copy on the meta device: what the
    driver needs to queue per-block tasks before any rank has loaded the model."""
    from hessian_core import ParamSpace, parameter_blocks

    model = _on_meta(spec)
    return list(parameter_blocks(model, ParamSpace(model)))


def parameter_count(spec: ModelSpec) -> int:
    """The parameters a group will analyse (``ParamSpace.numel``, tied weights once), counted on a weightless
    copy on the meta device: the driver records it before any rank loads the model, or without one at all."""
    from hessian_core import ParamSpace

    return ParamSpace(_on_meta(spec)).numel


def _on_meta(spec: ModelSpec) -> torch.nn.Module:
    """The model built from its config on the meta device, every parameter trainable (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .sharded_loading import model_config

    if spec.init == "random" and spec.path:
        config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, **spec.config_overrides)
    elif spec.init == "random":
        overrides = dict(spec.config_overrides)
        config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    else:  # a Hugging Face folder's own config, or a DCP checkpoint's model.config_path / model.config
        config = model_config(spec)
    with BUILD_LOCK, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    for p in model.parameters():
        p.requires_grad_(True)
    return model
