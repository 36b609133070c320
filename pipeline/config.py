"""Typed run configuration: YAML plus ``--set key=value`` overrides, validated before Ray or a model starts.

Every problem raises ConfigError with a one-line message naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """Invalid input: the CLI prints it as one line and exits with status 2."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None  # local folder, hub id, or builtin:demo
    revision: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    dtype: Literal["float64", "float32", "bfloat16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    config: dict | None = None  # HF config kwargs for init=random without a path (must include model_type)
    seed: int = 0  # weights for init=random
    config_path: str | None = None  # HF config folder (and tokenizer) of a DCP checkpoint's architecture
    loading: Literal["auto", "full", "sharded"] = "auto"  # auto: sharded on 2+ ranks or for DCP, else full
    # forward/backward dtype; null: model.dtype. Lower than model.dtype: FSDP2 mixed precision over the
    # model.dtype master shards (the FD step and the HVP stay in model.dtype)
    compute_dtype: Literal["float64", "float32", "bfloat16"] | None = None
    activation_checkpointing: bool = False  # recompute each transformer block in the backward


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = None  # local file (jsonl, json, parquet, csv, txt), folder, hub id, or builtin:demo
    text_column: str = "text"
    seq_len: int = 128
    batch_size: int = 8
    num_batches: int = 1
    shuffle_seed: int | None = None  # null: the first sequences, read lazily; a seed reads the whole source
    split: str = "train"  # dataset split (hub datasets and folders whose file names name splits)
    name: str | None = None  # dataset config name (hub datasets, folders with configs)
    format: Literal["text", "chat"] = "text"  # chat: a messages column rendered with the chat template
    messages_column: str = "messages"
    packing: bool = True  # true: join samples and cut seq_len sequences; false: one padded sample per sequence
    loss: Literal["causal_lm", "masked"] = "causal_lm"  # masked: assistant tokens only (format: chat)
    tokenizer: str | None = None  # folder or hub id of the tokenizer for text data (null: model.path's)


@dataclass(kw_only=True)
class ClusterConfig:
    address: str | None = None  # null: start a local Ray; "auto" or "ray://host:port": join a cluster
    num_workers: int = 1  # ranks per group (one FSDP2 process group)
    num_groups: int = 1  # the most groups running probes in parallel
    min_groups: int | None = None  # groups that must be alive for the run to go on (null: num_groups)
    placement_timeout_seconds: float = 120.0  # how long the run waits with fewer than min_groups alive
    worker_resources: dict | None = None  # custom Ray resources each rank needs, e.g. {"spot_gpu_node": 1}
    use_gpu: bool = False
    cpus_per_worker: int | None = None  # null: a local Ray shares this machine's cores out; on a cluster 1
    max_failures: int = 2  # errors raised by a probe (not node or actor losses) that are retried
    collective_timeout_seconds: float = 120.0  # a dead peer fails the group after this, not 30 minutes


@dataclass(kw_only=True)
class HVPConfig:
    eps: float | Literal["auto"] = "auto"
    scheme: Literal["central", "richardson"] = "central"
    assess: bool = True  # with a fixed eps, estimate its error first (1 gradient + 2-6 HVPs); false skips that


@dataclass(kw_only=True)
class LanczosConfig:
    steps: int = 30
    probes: int = 4  # 0: no SLQ (a block-analysis-only run)
    reorth: Literal["none", "window", "full"] = "window"
    window: int = 8
    vector_dtype: Literal["float64", "float32", "bfloat16"] = "float32"
    seed: int = 0


@dataclass(kw_only=True)
class DensityConfig:
    enabled: bool = True
    grid_size: int = 1000


@dataclass(kw_only=True)
class BlocksConfig:
    enabled: bool = False
    probes: int = 2  # Gaussian probes of the block analysis, and SLQ probes per block with spectra
    spectra: bool = False  # SLQ of every diagonal block H_bb: one task per (block, probe), block_ritz.parquet
    spectra_steps: int | None = None  # Lanczos steps per block probe (null: lanczos.steps), capped at the block size


@dataclass(kw_only=True)
class CheckpointConfig:
    # save each probe's Lanczos state every this many steps (0: never); auto: after the first step, then as
    # often as keeps the writes under 5% of the compute (a large model's window is many GB per save)
    every: int | Literal["auto"] = "auto"


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hvp: HVPConfig = field(default_factory=HVPConfig)
    lanczos: LanczosConfig = field(default_factory=LanczosConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/latest"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def cpus_per_worker(self) -> int:
        """CPU cores (and torch threads) per rank."""
        cl = self.cluster
        if cl.cpus_per_worker is not None:
            return cl.cpus_per_worker
        if cl.address is None and not os.environ.get("RAY_ADDRESS"):
            return max(1, (os.cpu_count() or 1) // (cl.num_workers * cl.num_groups))
        return 1

    def result_dict(self) -> dict:
        """The keys that decide the results (see ``results_part``)."""
        return results_part(self.to_dict())

    def min_groups(self) -> int:
        return self.cluster.num_groups if self.cluster.min_groups is None else self.cluster.min_groups

    def digest(self) -> str:
        """Identifies the config in checkpoints: a checkpoint is only resumed under the same results config."""
        import hashlib

        return hashlib.sha256(json.dumps(self.result_dict(), sort_keys=True).encode()).hexdigest()[:16]


def results_part(config: dict) -> dict:
    """A config's keys that decide the results: all but ``cluster`` (the layout) and ``output_dir``, so that a
    run may be resumed under another layout or on another cluster."""
    return {k: v for k, v in config.items() if k not in ("cluster", "output_dir")}


POSITIVE = ["data.seq_len", "data.batch_size", "data.num_batches", "cluster.num_workers", "cluster.num_groups",
            "lanczos.steps", "blocks.probes", "density.grid_size"]
MAX_LANCZOS_STEPS = 10_000
NON_NEGATIVE = ["lanczos.window", "lanczos.probes", "cluster.max_failures"]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    return False, value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        ok, converted = _matches(value, tp)
        if not ok:
            raise ConfigError(f"{key}: {value!r} is not valid; expected {_type_name(tp)}")
        kwargs[name] = converted
    return cls(**kwargs)


def _get(config: RunConfig, key: str) -> Any:
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. lanczos.steps=40")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else None
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | None, overrides: list[str] | None = None, *, check: bool = True) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, type-check and (``check``) validate.

    A sweep's base config is only type-checked: its grid may supply what it lacks (a fixed eps, a model path)."""
    tree: dict = {}
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory; give a YAML file (see configs/)")
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    for assignment in overrides or []:
        _set_override(tree, assignment)
    config = _build(RunConfig, tree, "")
    if check:
        validate(config)
    return config


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The problem with its line and column (1-based), e.g. "line 3, column 9: mapping values are not allowed"."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def validate(config: RunConfig) -> None:
    """Checks that need no files, Ray or model; data and model paths are checked by the driver's preflight."""
    for key in POSITIVE:
        if _get(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {_get(config, key)}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
    if config.lanczos.steps > MAX_LANCZOS_STEPS:
        raise ConfigError(f"lanczos.steps={config.lanczos.steps} is more than {MAX_LANCZOS_STEPS}: SLQ's density and "
                          f"extreme eigenvalues settle within a few hundred steps, each step costs 2-4 gradient "
                          f"passes, and Lanczos in floating point loses orthogonality long before; use <= "
                          f"{MAX_LANCZOS_STEPS}")
    if config.checkpoint.every != "auto" and config.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every must be >= 0 or 'auto', got {config.checkpoint.every}")
    if config.blocks.spectra_steps is not None and config.blocks.spectra_steps < 1:
        raise ConfigError(f"blocks.spectra_steps must be >= 1 or null, got {config.blocks.spectra_steps}")
    if config.lanczos.probes == 0 and not config.blocks.enabled and not config.blocks.spectra:
        raise ConfigError("lanczos.probes=0 and blocks.enabled=false leave nothing to compute; "
                          "set lanczos.probes >= 1 or blocks.enabled=true")
    if config.data.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2 (a next-token loss needs two tokens), got {config.data.seq_len}")
    if config.hvp.eps != "auto" and not config.hvp.eps > 0:
        raise ConfigError(f"hvp.eps must be a positive number or 'auto', got {config.hvp.eps}")
    if config.hvp.eps == "auto" and not config.hvp.assess:
        raise ConfigError("hvp.assess=false needs a fixed hvp.eps (eps: auto is chosen by the assessment)")
    if config.data.batch_size % config.cluster.num_workers:
        raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by "
                          f"cluster.num_workers={config.cluster.num_workers}: each rank needs an equal slice")
    if config.cluster.cpus_per_worker is not None and config.cluster.cpus_per_worker < 1:
        raise ConfigError(f"cluster.cpus_per_worker must be >= 1 or null, got {config.cluster.cpus_per_worker}")
    if config.cluster.collective_timeout_seconds <= 0:
        raise ConfigError("cluster.collective_timeout_seconds must be > 0")
    if config.cluster.placement_timeout_seconds <= 0:
        raise ConfigError("cluster.placement_timeout_seconds must be > 0")
    if config.cluster.min_groups is not None and not 1 <= config.cluster.min_groups <= config.cluster.num_groups:
        raise ConfigError(f"cluster.min_groups must be between 1 and cluster.num_groups={config.cluster.num_groups} "
                          f"(or null for num_groups), got {config.cluster.min_groups}")
    for name, amount in (config.cluster.worker_resources or {}).items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
            raise ConfigError(f"cluster.worker_resources.{name} must be a positive number, got {amount!r}")
    _check_precision(config.model)
    if config.model.init == "pretrained" and not config.model.path:
        raise ConfigError("model.path is required when model.init is 'pretrained'")
    if config.model.loading == "sharded" and config.model.init == "random":
        raise ConfigError("model.loading=sharded reads pretrained weights; with model.init=random set "
                          "model.loading=auto or full")
    if config.model.init == "random" and not config.model.path and not (config.model.config or {}).get("model_type"):
        raise ConfigError("model.init=random needs model.path (a folder with config.json) or model.config.model_type")
    if config.data.loss == "masked" and config.data.format != "chat":
        raise ConfigError("data.loss=masked counts assistant tokens only, which needs data.format=chat; "
                          "use data.loss=causal_lm for text")
    if not config.data.split:
        raise ConfigError("data.split must be a split name such as 'train' or 'validation'")
    if not config.data.path:
        raise ConfigError("data.path is required (a local file or folder, a hub dataset id, or builtin:demo)")
    if config.cluster.use_gpu:
        import torch

        if not torch.cuda.is_available() and config.cluster.address is None:
            raise ConfigError("cluster.use_gpu is true but this machine has no CUDA GPU; set cluster.use_gpu=false")


_BITS = {"float64": 64, "float32": 32, "bfloat16": 16}


def _check_precision(model: ModelConfig) -> None:
    compute = model.compute_dtype
    if compute is not None and _BITS[compute] > _BITS[model.dtype]:
        raise ConfigError(f"model.compute_dtype={compute} is wider than model.dtype={model.dtype}; set "
                          f"model.dtype={compute} (the master parameters) or a compute_dtype of at most {model.dtype}")
