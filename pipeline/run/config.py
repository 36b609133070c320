"""Typed run configuration: YAML plus ``--set key=value`` overrides, validated before Ray or a model starts.

Each key is declared once, with ``key()``: its type (the annotation), default, one-line doc and single-key bounds.
Type checks (``_build``), bound checks and their messages (``validate``) and docs/config.md's configuration table
(``reference_table``) all come from those declarations; only rules between keys are written out in ``validate``.
Every problem raises ConfigError with a one-line message naming the key and what would be valid.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Union

import yaml


class ConfigError(ValueError):
    """Invalid input: the CLI prints it as one line and exits with status 2."""


def key(default: Any, doc: str, *, min: float | None = None, max: float | None = None, above: float | None = None,
        required: bool = False, why_min: str | None = None, why_max: str | None = None):
    """A config key: its default, its doc (markdown, the docs/config.md table's meaning) and its single-key bounds.

    ``min``/``max`` are inclusive, ``above`` exclusive; on a mapping they bound each of its values. ``required``:
    null or empty is refused. ``why_min``/``why_max`` end the error message of that bound with the reason."""
    metadata = {"doc": doc, "min": min, "max": max, "above": above, "required": required,
                "why_min": why_min, "why_max": why_max}
    if isinstance(default, (dict, list)):  # a mutable default is copied for each config
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = key(None, "local HF folder, DCP checkpoint folder, hub id, or `builtin:demo`; required with "
                                 "`init: pretrained`")
    revision: str | None = key(None, "hub revision")
    init: Literal["pretrained", "random"] = key(
        "pretrained", "`pretrained`, or `random` (weights from `model.seed`; config from `model.path` or "
                      "`model.config`)")
    dtype: Literal["float64", "float32", "bfloat16"] = key(
        "float32", "`float64`, `float32`, `bfloat16`: the parameters' storage (the master copy the FD step lands on)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = key(
        "sdpa", "`sdpa`, `eager`, `flash_attention_2`")
    config: dict | None = key(None, "HF config kwargs incl. `model_type`, for `init: random` without a path, or a DCP "
                                    "`model.path`'s architecture")
    seed: int = key(0, "seed of the weights for `init: random`")
    config_path: str | None = key(None, "HF config folder (`config.json`, tokenizer) of a DCP `model.path`; ignored "
                                        "for an HF folder, which has its own")
    loading: Literal["auto", "full", "sharded"] = key(
        "auto", "`auto` (sharded on 2+ ranks or from DCP, else full), `full`, `sharded`; see [models.md](models.md)")
    compute_dtype: Literal["float64", "float32", "bfloat16"] | None = key(
        None, "forward/backward dtype; null: `model.dtype`; lower than `model.dtype` (e.g. `bfloat16` over `float32`): "
              "FSDP2 mixed precision over the `model.dtype` master shards (the FD step and the HVP stay in "
              "`model.dtype`), see [precision.md](precision.md)")
    activation_checkpointing: bool = key(
        False, "recompute each transformer block in the backward (less activation memory, about one more forward per "
               "gradient)")


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = key(None, "file (jsonl, json, parquet, csv, txt), folder, hub dataset id, or `builtin:demo`",
                           required=True)
    text_column: str = key("text", "column to tokenize when there is no `input_ids` column")
    seq_len: int = key(128, "tokens per sequence", min=2, why_min="a next-token loss needs two tokens")
    batch_size: int = key(8, "sequences per global batch; split evenly over a group's ranks", min=1)
    num_batches: int = key(1, "batches in the analysis set (its loss is the token mean over all of them)", min=1)
    shuffle_seed: int | None = key(None, "shuffle sequences before taking the first `num_batches * batch_size` (reads "
                                         "the whole source; null streams only what is needed)")
    split: str = key("train", "dataset split (hub datasets; folders whose file names name splits)", required=True)
    name: str | None = key(None, "dataset config name (hub datasets; folders with configs)")
    format: Literal["text", "chat"] = key(
        "text", "`text`, or `chat`: the `messages_column` rendered with the tokenizer's chat template (an "
                "`input_ids` column beside it is not read)")
    messages_column: str = key("messages", "the conversations' column for `format: chat`")
    packing: bool = key(True, "join samples and cut `seq_len` sequences; `false`: one sample per sequence, "
                              "right-padded with an attention mask")
    loss: Literal["causal_lm", "masked"] = key(
        "causal_lm", "`causal_lm` (every token but padding and a pre-tokenized `labels` column's -100), or `masked`: "
                     "assistant tokens only (`format: chat`)")
    tokenizer: str | None = key(None, "folder or hub id of the tokenizer for text data (null: `model.path`'s); for a "
                                      "model folder saved without one")


@dataclass(kw_only=True)
class ClusterConfig:
    address: str | None = key(None, "null: local Ray; `auto`; `ray://host:port`")
    num_workers: int = key(1, "ranks per group (one FSDP2 process group)", min=1)
    num_groups: int = key(1, "the most groups running probes in parallel", min=1)
    min_groups: int | None = key(None, "groups that must be alive (null: `num_groups`); fewer placed for "
                                       "`placement_timeout_seconds` fails the run, resumably", min=1)
    placement_timeout_seconds: float = key(120.0, "how long a run waits with fewer than `min_groups` groups placed",
                                           above=0)
    worker_resources: dict | None = key(None, "custom Ray resources each rank needs, e.g. `{spot_a100: 1}`", above=0)
    use_gpu: bool = key(False, "one GPU per rank, nccl")
    cpus_per_worker: int | None = key(None, "CPU cores (torch threads) per rank; null: a local Ray shares out this "
                                            "machine's cores, a cluster 1", min=1)
    max_failures: int = key(2, "errors raised by a task that are retried on a new group (lost nodes and killed ranks "
                               "are not counted)", min=0)
    collective_timeout_seconds: float = key(120.0, "process-group timeout: a dead peer fails the group after this, "
                                                   "not after 30 minutes", above=0)
    keep_groups: bool = key(False, "a run in a process already connected to Ray (a script or notebook running "
                                   "several analyses) leaves its idle groups to the next such run of the same "
                                   "layout, which loads its model in the same worker processes; they hold their "
                                   "resources until then, until a run needs another layout, or until the process "
                                   "disconnects. A sweep always does this between its points")


@dataclass(kw_only=True)
class HVPConfig:
    eps: float | Literal["auto"] = key("auto", "step size, or `auto`", above=0)
    scheme: Literal["central", "richardson", "forward"] = key(
        "central", "`central` (2 passes, O(eps^2)), `richardson` (4 passes, O(eps^4)) or `forward` (1 pass, O(eps): "
                   "reuses the gradient at theta, one more gradient-sized buffer; its error goes as sqrt(eps_mach), 1e-3 against "
                   "1e-4 in float32: good for densities smoothed at 1% of the width, not for tight extremes, see "
                   "docs/precision.md)")
    assess: bool = key(True, "with a fixed `hvp.eps`, estimate its error before the run (2-6 HVPs); "
                             "`false` skips that, e.g. in an eps sweep already measured with `hvp-error`")
    restore: Literal["auto", "device", "host"] = key(
        "auto", "where the exact copy that restores the parameters after each HVP lives: `device`, `host` (pinned "
                "host memory on GPUs), or `auto`: `device` where `plan` says the run fits, else `host`")


@dataclass(kw_only=True)
class LanczosConfig:
    steps: int | Literal["auto"] = key(
        30, "Lanczos steps per probe, at most 10000 (the density settles within a few hundred; each step is 2-4 "
            "gradient passes); `auto`: each probe stops once its extreme Ritz values are converged and its "
            "quadrature rule has settled, both to `lanczos.tol` x its width, or at `lanczos.max_steps`",
        min=1, max=10_000,
        why_max="SLQ's density and extreme eigenvalues settle within a few hundred steps, each step costs "
                "2-4 gradient passes, and Lanczos in floating point loses orthogonality long before")
    max_steps: int = key(300, "with `steps: auto`, the most steps a probe takes", min=2, max=10_000)
    tol: float = key(1e-3, "with `steps: auto`, a probe stops when the residual bounds of its extreme Ritz values and "
                           "the W1 distance between its rule now and 5 steps back are each <= tol x its width",
                     above=0)
    probes: int | Literal["auto"] = key(
        4, "SLQ probes (Rademacher, unit norm); 0 for a block-analysis-only run; `auto`: probes are added in waves "
           "of `cluster.num_groups` until the trace's standard error is <= `trace.rtol` x abs(trace) and the density "
           "of the first half of the probes is within `density.tol` of the second half's, or at "
           "`lanczos.max_probes`", min=0)
    max_probes: int = key(64, "with `probes: auto`, the most probes a run takes", min=2)
    reorth: Literal["none", "window", "full"] = key("window", "`none`, `window` (last `window` vectors), `full`")
    operator: Literal["hessian", "gauss_newton", "residual"] = key(
        "hessian", "the matrix the SLQ probes run on: `hessian` (the FD HVP), `gauss_newton` (G = J^T H_out J, "
                   "from FD Jacobian-vector products of the logits), `residual` (H - G): sweep it to overlay the "
                   "three densities (`compare.png`, the Papyan decomposition)")
    window: int = key(8, "reorthogonalization window", min=0)
    vector_dtype: Literal["float64", "float32", "bfloat16"] = key(
        "float32", "storage of Lanczos vectors: `float64`, `float32`, `bfloat16`")
    seed: int = key(0, "probe seed: probes are a pure function of (seed, probe id, parameter name)")
    vectors: Literal["auto", "device", "host"] = key(
        "auto", "where the kept Lanczos vectors live: `device`, `host` (pinned host memory on GPUs, streamed through "
                "the device a row at a time), or `auto`: `device` where `plan` says the run fits, else `host`")


    @property
    def step_budget(self) -> int:
        """Steps a probe takes at most: ``steps``, or ``max_steps`` with ``steps: auto``."""
        return self.max_steps if self.steps == "auto" else self.steps

    @property
    def probe_budget(self) -> int:
        """Probes a run takes at most: ``probes``, or ``max_probes`` with ``probes: auto``."""
        return self.max_probes if self.probes == "auto" else self.probes


@dataclass(kw_only=True)
class TraceConfig:
    rtol: float = key(0.02, "with `lanczos.probes: auto`, the trace's standard error a run reaches: <= rtol x abs(trace)",
                      above=0)
    estimator: Literal["slq", "hutchpp", "deflated"] = key(
        "slq", "`slq`: Hutchinson over the SLQ probes (one trace sample a probe); `hutchpp`: also Hutch++ (Meyer et "
               "al. 2021) as its own task beside the probes, the exact trace on a sketch of `trace.sketch` HVPs plus "
               "Hutchinson on the rest; `deflated`: also the `trace.sketch` eigenvalues largest in magnitude "
               "(thick-restart Lanczos, `eigen.tol`) summed exactly plus Hutchinson on the rest. Either samples until "
               "its standard error is <= `trace.rtol` x abs(trace) or `trace.max_hvps`; `trace.parquet`, run.json's "
               "`trace`")
    sketch: int = key(10, "with `estimator: hutchpp` the sketch's vectors, with `deflated` the eigenpairs (vectors "
                          "held either way)", min=1)
    max_hvps: int = key(200, "with `estimator: hutchpp` or `deflated`, its HVP budget, the sketch's or the "
                             "eigenpairs' included", min=3)


@dataclass(kw_only=True)
class DensityConfig:
    enabled: bool = key(True, "write density.parquet / density.png")
    grid_size: int = key(1000, "density grid points, 2 to 100000", min=2, max=100_000,
                         why_min="a density needs at least its two end points",
                         why_max="the density is evaluated at every grid point for every Ritz value at once, and a "
                                 "plot is a few thousand pixels wide")
    tol: float = key(0.005, "with `lanczos.probes: auto`, how close (W1 over the spectrum's width) the density of the "
                            "first half of the probes must be to the second half's", above=0)


@dataclass(kw_only=True)
class BlocksConfig:
    enabled: bool = key(False, "block-diagonal analysis")
    probes: int = key(2, "Gaussian probes for block analysis, and SLQ probes per block with `blocks.spectra`", min=1)
    spectra: bool = key(False, "SLQ of every diagonal block H_bb (v zeroed outside the block, H v restricted to it): "
                               "one task per (block, probe) over the groups; `block_ritz.parquet` and an overlay on "
                               "`density.png`")
    spectra_steps: int | None = key(None, "Lanczos steps per block probe (null: `lanczos.steps`), capped at the "
                                          "block's size", min=1)
    approximations: list[str] = key(
        [], "curvature approximations measured against the exact H v, each on its own `blocks.probes` Gaussian "
            "probes (one task a probe): `block_diagonal`, `block_tridiagonal` (each block and its neighbours in "
            "model order), `lowrank_<k>` (the k eigenpairs of H largest in magnitude), "
            "`block_diagonal_plus_lowrank_<k>` (block-diagonal plus the k largest-magnitude eigenpairs of what it "
            "misses, H - B), `gauss_newton` (G v); `approximations.parquet`, `approximations.png`")


@dataclass(kw_only=True)
class LandscapeConfig:
    points_1d: int = key(21, "grid points of the loss along theta + t u_1 (odd: the grid is symmetric about t = 0; 0: "
                             "none); one forward over the analysis set each", min=0, max=1001,
                         why_max="each point is one forward pass over the analysis set")
    points_2d: int = key(11, "grid points per axis of the loss over theta + s u_1 + t u_2 (odd; 0: none; needs "
                             "`eigen.k` >= 2); points_2d^2 forwards", min=0, max=101,
                         why_max="the grid is points_2d^2 forward passes over the analysis set")
    range: float | Literal["auto"] = key(
        "auto", "half-width of the slices along the unit eigenvectors; `auto`: per axis, the t where the quadratic "
                "term lambda_i t^2 / 2 is as large as the loss (the quadratic term alone doubles it at the ends)",
        above=0)


@dataclass(kw_only=True)
class EigenConfig:
    k: int = key(0, "top-k eigenpairs by thick-restart Lanczos on the FD HVP at the run's eps, one task beside the "
                    "probes (0: none): `eigenpairs.parquet`, `eigenvectors/`, `eigen_mass.parquet`, "
                    "`landscape.parquet`", min=0)
    which: Literal["LA", "SA", "LM"] = key("LA", "`LA` the largest, `SA` the smallest (most negative), `LM` the "
                                                 "largest in magnitude")
    tol: float = key(1e-4, "a pair is converged when the norm of its residual H u - lambda u is at most tol x the "
                           "largest eigenvalue magnitude (estimated)", above=0)
    max_hvps: int = key(500, "the solver's HVP budget; past it the run records which pairs converged", min=1)
    basis: int | None = key(None, "vectors the solver holds (null: k + max(k, 10)); at least `eigen.k` + 2", min=3)
    save_vectors: bool = key(True, "save the eigenvectors sharded as a torch.distributed.checkpoint folder "
                                   "`eigenvectors/` (one parameter-named mapping per eigenvector)")
    landscape: LandscapeConfig = field(default_factory=LandscapeConfig)


@dataclass(kw_only=True)
class CheckpointConfig:
    # a large model's window is many GB per save, hence auto rather than a fixed interval
    every: int | Literal["auto"] = key(
        "auto", "save the Lanczos state every this many steps (0: never); `auto`: after step 1, then whenever the "
                "steps since the last save took 20x as long as the save held the compute (<= 5% overhead)", min=0)


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hvp: HVPConfig = field(default_factory=HVPConfig)
    lanczos: LanczosConfig = field(default_factory=LanczosConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    eigen: EigenConfig = field(default_factory=EigenConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = key("runs/latest", "where results go")
    log_to: list[str] = key([], "log sinks that receive a finished run's key figures (`hessian/lambda_max`, "
                                "`lambda_min`, `trace`, `eps`, `hvp_count`, `seconds`, ...) at its end: "
                                "`tensorboard:DIR`, `mlflow:URI_OR_DIR` (a folder: MLflow's local file store), "
                                "`wandb` or `wandb:DIR` (offline); a sweep writes one step per point (a `model.path` "
                                "sweep: the checkpoint's number)")

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


# where a run keeps its Lanczos vectors and its restore copy changes no bit of its results (hessian_core.lanczos)
PLACEMENT_KEYS = {"lanczos": ("vectors",), "hvp": ("restore",)}


def results_part(config: dict) -> dict:
    """A config's keys that decide the results: all but ``cluster`` (the layout), ``output_dir`` and the memory
    placements (``PLACEMENT_KEYS``), so that a run may be resumed under another layout, on another cluster, or
    with its vectors moved to host memory (and a run recorded before those keys existed still matches). The
    ``eigen`` section counts only where something uses it (``eigen.k`` > 0, or a low-rank approximation's
    eigenpairs), ``lanczos.operator`` only when it is not ``hessian`` and ``blocks.approximations`` only when not
    empty: a run recorded before those keys existed is the same as one with them off."""
    part = {k: ({name: value for name, value in v.items() if name not in PLACEMENT_KEYS[k]}
                if k in PLACEMENT_KEYS and isinstance(v, dict) else v)
            for k, v in config.items() if k not in ("cluster", "output_dir", "log_to")}
    approximations = (part.get("blocks") or {}).get("approximations") or []
    if not (part.get("eigen") or {}).get("k") and not any("lowrank" in str(a) for a in approximations):
        part.pop("eigen", None)
    for section, name, default in (("lanczos", "operator", "hessian"), ("blocks", "approximations", [])):
        if isinstance(part.get(section), dict) and part[section].get(name, default) == default:
            part[section] = {k: v for k, v in part[section].items() if k != name}
    # the auto settings' keys count only where auto uses them
    lanczos = part.get("lanczos") or {}
    unused = {("lanczos", "max_steps"), ("lanczos", "tol")} if lanczos.get("steps") != "auto" else set()
    if lanczos.get("probes") != "auto":
        unused |= {("lanczos", "max_probes"), ("density", "tol")}
    for section, name in unused:
        if isinstance(part.get(section), dict):
            part[section] = {k: v for k, v in part[section].items() if k != name}
    if lanczos.get("probes") != "auto" and (part.get("trace") or {}).get("estimator", "slq") == "slq":
        part.pop("trace", None)
    return part


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first key (dotted, in ``new``'s order, then ``old``'s) whose values differ, as
    "KEY: OLD before, NEW now"; None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            found = first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.') or 'config'}: {old!r} before, {new!r} now"


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
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
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp)
        checked = [_matches(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
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


def load_config(path: str | None, overrides: list[str] | None = None, *, check: bool = True,
                this_machine: bool = True) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, type-check and (``check``) validate.

    A sweep's base config is only type-checked: its grid may supply what it lacks (a fixed eps, a model path).
    ``this_machine=False`` (``plan``, for a cluster planned from elsewhere) skips the checks of this machine's
    devices."""
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
        validate(config, this_machine=this_machine)
    return config


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The problem with its line and column (1-based), e.g. "line 3, column 9: mapping values are not allowed"."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def config_keys(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every key below the sections, in declaration order: (dotted name, its field, its type)."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_BOUNDS = (("min", ">=", operator.lt), ("above", ">", operator.le), ("max", "<=", operator.gt))


def _bound_problem(name: str, value: Any, meta: typing.Mapping, tp) -> str | None:
    """What breaks the key's declared bounds, as a one-line message, or None."""
    if meta.get("required") and value in (None, ""):
        return f"{name} is required: {meta['doc'].replace('`', '')}"
    bounded = any(meta.get(bound) is not None for bound, _, _ in _BOUNDS)
    if isinstance(value, dict) and bounded:  # e.g. each of cluster.worker_resources' amounts
        for item, amount in value.items():
            if not _is_number(amount):
                return f"{name}.{item} must be a number, got {amount!r}"
            problem = _bound_problem(f"{name}.{item}", amount, meta, float)
            if problem:
                return problem
        return None
    if not _is_number(value):  # null and 'auto' are allowed by the type, which _build checked
        return None
    # the type's other values, e.g. " or null" for int | None, " or 'auto'" for int | Literal["auto"]
    others = [a for a in typing.get_args(tp) if a not in (int, float)]
    alternatives = "".join(f" or {_type_name(a)}" for a in others)
    for bound, op, breaks in _BOUNDS:
        limit = meta.get(bound)
        if limit is not None and breaks(value, limit):
            why = meta.get(f"why_{bound}")
            return f"{name} must be {op} {limit}{alternatives}, got {value}" + (f": {why}" if why else "")
    return None


def validate(config: RunConfig, *, this_machine: bool = True) -> None:
    """The declared bounds of every key, then the rules between keys. Checks that need no files, Ray or model;
    data and model paths are checked by the driver's preflight. ``this_machine``: also that a GPU run has a
    GPU here (or a cluster address)."""
    for name, f, tp in config_keys():
        problem = _bound_problem(name, _get(config, name), f.metadata, tp)
        if problem:
            raise ConfigError(problem)
    if config.lanczos.steps == "auto" and config.lanczos.max_steps < 11:
        raise ConfigError(f"lanczos.max_steps must be >= 11 with lanczos.steps=auto (the stopping rule compares the "
                          f"rule with the one 5 steps back, from step 10), got {config.lanczos.max_steps}")
    if (config.lanczos.probes == 0 and not config.blocks.enabled and not config.blocks.spectra
            and config.eigen.k == 0 and not config.blocks.approximations):
        raise ConfigError("lanczos.probes=0, blocks.enabled=false, blocks.approximations=[] and eigen.k=0 leave "
                          "nothing to compute; set lanczos.probes >= 1, blocks.enabled=true, blocks.approximations "
                          "or eigen.k >= 1")
    _check_eigen(config.eigen)
    _check_approximations(config)
    _check_log_to(config.log_to)
    if config.hvp.eps == "auto" and not config.hvp.assess:
        raise ConfigError("hvp.assess=false needs a fixed hvp.eps (eps: auto is chosen by the assessment)")
    if config.data.batch_size % config.cluster.num_workers:
        raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by "
                          f"cluster.num_workers={config.cluster.num_workers}: each rank needs an equal slice")
    if (config.cluster.min_groups or 0) > config.cluster.num_groups:
        raise ConfigError(f"cluster.min_groups must be <= cluster.num_groups={config.cluster.num_groups} "
                          f"(or null for num_groups), got {config.cluster.min_groups}")
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
    if config.cluster.use_gpu and this_machine:
        import torch

        if not torch.cuda.is_available() and config.cluster.address is None:
            raise ConfigError("cluster.use_gpu is true but this machine has no CUDA GPU; set cluster.use_gpu=false")


def _check_log_to(log_to: list[str]) -> None:
    from hessian_core.integrations.sinks import parse_sink

    for entry in log_to:
        try:
            parse_sink(entry)
        except ValueError as e:
            raise ConfigError(f"log_to: {e}") from None


def _check_eigen(eigen: EigenConfig) -> None:
    """The eigen section's rules between keys: a basis with room for the k pairs and two more, odd grids."""
    if eigen.basis is not None and eigen.k and eigen.basis < eigen.k + 2:
        raise ConfigError(f"eigen.basis must be >= eigen.k + 2 = {eigen.k + 2} (or null for k + max(k, 10)), got "
                          f"{eigen.basis}")
    for name in ("points_1d", "points_2d"):
        points = getattr(eigen.landscape, name)
        if points and (points < 3 or points % 2 == 0):
            raise ConfigError(f"eigen.landscape.{name} must be an odd number >= 3 (a grid symmetric about 0, which "
                              f"it includes) or 0 for none, got {points}")


def _check_approximations(config: RunConfig) -> None:
    """Each name of blocks.approximations known (hessian_core.approximations), a low-rank one with its rank, none
    twice."""
    from hessian_core.approximations import LOW_RANK, NAMES, parse_approximation

    names = config.blocks.approximations
    for name in names:
        try:
            kind, rank = parse_approximation(name)
        except ValueError as e:
            raise ConfigError(f"blocks.approximations: {e}") from None
        if kind in LOW_RANK and rank is None:
            raise ConfigError(f"blocks.approximations: {name!r} needs its rank, e.g. {name}_8; valid: "
                              f"{', '.join(NAMES)} (k >= 1)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"blocks.approximations names {repeated[0]!r} twice; list each approximation once")


_BITS = {"float64": 64, "float32": 32, "bfloat16": 16}


def _check_precision(model: ModelConfig) -> None:
    compute = model.compute_dtype
    if compute is not None and _BITS[compute] > _BITS[model.dtype]:
        raise ConfigError(f"model.compute_dtype={compute} is wider than model.dtype={model.dtype}; set "
                          f"model.dtype={compute} (the master parameters) or a compute_dtype of at most {model.dtype}")


def reference_table() -> str:
    """docs/config.md's configuration table (key | default | meaning), from the declarations, in their order."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {_shown_default(f)} | {f.metadata['doc']} |" for name, f, _ in config_keys()]
    return "\n".join(rows)


def _shown_default(f: dataclasses.Field) -> str:
    """The default as YAML would be written: null, true, 120; "-" for a key that must be given."""
    if f.metadata["required"] and f.default is None:
        return "-"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None or isinstance(value, (bool, dict, list)):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)
