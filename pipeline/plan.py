"""``hessian-spectrum plan CONFIG``: per-rank memory, HVP count and wall time of a run, before launching it.

No Ray, no weights: the model is built from its config under torch's FakeTensorMode (shapes and dtypes, no
storage), which gives the parameter count, the FSDP2 shard sizes and, by running the loss forward on fake
inputs with a saved-tensors hook, the bytes autograd keeps for the backward: the activation estimate, per
transformer block (so the same trace gives the figure with activation checkpointing).

Per rank, with S the largest local shard (FSDP2 pads dim 0 to a multiple of the ranks):
- parameter shard, gradient shard, the FD HVP's retained copy: S x the master dtype each;
- the FD HVP's accumulator, S x float32, only for a bfloat16 master: otherwise the HVP's gradient passes
  accumulate into the gradient shard itself;
- Lanczos vectors: the rows ``lanczos`` keeps (``window`` for reorth=window, all steps + 1 for full, 2 for
  none) x S x ``lanczos.vector_dtype``;
- gathered parameters (FSDP2 or mixed precision only): the root's parameters (embeddings, head, final norm)
  stay gathered through forward and backward, plus two blocks (the current one and the prefetched one), in
  the compute dtype; and unsharded gradients (compute + reduce dtype) before their reduce-scatter: the
  root's, held through the whole backward, and one block's;
- activations of one batch slice ``batch_size / num_workers x seq_len`` (batches are accumulated one at a
  time), plus the backward's transient: twice the largest saved tensor (its gradient and one temporary).
The total is their sum, a bound for the peak at the start of a backward when gradients from an earlier
batch are held. Host memory while loading is one full model in the master dtype plus its shard (plus the
weight file's pages for a pretrained model), or only the shard where the ranks load sharded
(``hessian_core.models.choose_loading``); on a CPU run host and device are the same memory, so the peak
is the larger of the two. Checkpoints write the kept Lanczos rows (plus 2) per save, not held in memory.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from .config import ConfigError, RunConfig

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2}
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
         "gb": 10**9, "tb": 10**12}
GIB = 2**30
MAX_SUGGESTED_WORKERS = 256
# FD HVP calibration before the probes, in gradient passes: one gradient, the ladder's HVPs (2 per try,
# usually one try), the mixed-precision round-off HVP, and the timed gradient.
CALIBRATION_GRADIENTS = 1 + 2 * 2 + 1


def parse_size(text: str) -> int:
    """``80GiB``, ``80 GB``, ``512MiB`` or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GiB, 24GB or 512MiB")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if not value > 0:
        raise ConfigError(f"--device-memory {text!r} must be positive")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the plan needs from the model: parameter counts and the bytes its loss forward saves."""

    num_params: int
    local_params: int  # the largest rank's shard (numel)
    root_params: int  # parameters outside the transformer blocks
    block_params: int  # the largest block's
    num_blocks: int
    saved_outside_blocks: int  # bytes saved for backward outside the blocks (embeddings, head, logits, loss)
    saved_per_block: list[int] = field(default_factory=list)  # bytes each block saves
    block_inputs: list[int] = field(default_factory=list)  # bytes of what a checkpointed block keeps
    largest_saved: int = 0  # bytes of the largest single saved tensor


@contextmanager
def _no_packed_sequences():
    """HF's mask code checks position ids for packed sequences by reading values, which fake tensors cannot;
    analysis sequences are never packed, so the check is skipped (and sdpa keeps its is_causal path)."""
    import transformers.masking_utils as mu

    saved = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = saved


def hf_config(config: RunConfig, model_path: str | None):
    """The model's HF config without weights, as the ranks build it (``hessian_core.models.hf_config``; the
    demo's architecture before its folder exists); ConfigError, one line, where it cannot be read."""
    from hessian_core.models import checkpoint_format
    from hessian_core.models import hf_config as resolve

    from . import demo
    from .preflight import spec_for

    if model_path and model_path != demo.DEMO:
        from .data import looks_local

        if looks_local(model_path) and not os.path.isdir(model_path):
            raise ConfigError(f"model.path {model_path!r} does not exist (expected a local model folder or hub id)")
        if (os.path.isdir(model_path) and checkpoint_format(model_path) != "dcp"
                and not os.path.exists(os.path.join(model_path, "config.json"))):
            raise ConfigError(f"model.path {model_path!r} has no config.json; it is not a Hugging Face model folder")
    try:
        return resolve(spec_for(config, model_path))
    except (OSError, ValueError) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None


def trace_model(spec, *, world: int, batch: int, seq_len: int) -> ModelShape:
    """Build ``spec``'s model on fake tensors (in ``spec.dtype``: the compute dtype) and run the analysis loss
    forward on a fake ``[batch, seq_len]`` batch."""
    import torch

    from hessian_core import causal_lm_loss, transformer_blocks
    from hessian_core.models import build, fake_mode

    saved: dict[int, tuple[int, str]] = {}  # storage -> (bytes, owner: a block index or "outside")
    keep_alive = []  # storages stay referenced so their addresses are not reused during the trace
    current = ["outside"]
    inputs: list[int] = []
    model = build(spec, device="fake", for_analysis=False)
    with fake_mode(model), _no_packed_sequences():
        params = {id(p): p for p in model.parameters()}.values()
        param_storages = {p.untyped_storage()._cdata for p in params}
        blocks = transformer_blocks(model)

        def enter(index):
            def hook(module, args, kwargs):
                current[0] = index
                hidden = args[0] if args else kwargs.get("hidden_states")
                inputs.append(hidden.untyped_storage().nbytes() if hidden is not None else 0)
            return hook

        def leave(module, args, output):
            current[0] = "outside"

        for i, (_, block) in enumerate(blocks):
            block.register_forward_pre_hook(enter(i), with_kwargs=True)
            block.register_forward_hook(leave)

        def pack(t):
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in param_storages and key not in saved:
                saved[key] = (storage.nbytes(), current[0])
                keep_alive.append(storage)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(model, torch.zeros(batch, seq_len, dtype=torch.long))
        block_numels = [sum(p.numel() for p in b.parameters()) for _, b in blocks]
        num_params = sum(p.numel() for p in params)
        local = sum(math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if p.dim() else p.numel()
                    for p in params)
    per_block = [sum(b for b, owner in saved.values() if owner == i) for i in range(len(blocks))]
    return ModelShape(num_params=num_params, local_params=local, root_params=num_params - sum(block_numels),
                      block_params=max(block_numels, default=0), num_blocks=len(blocks),
                      saved_outside_blocks=sum(b for b, owner in saved.values() if owner == "outside"),
                      saved_per_block=per_block, block_inputs=inputs[:len(blocks)],
                      largest_saved=max((b for b, _ in saved.values()), default=0))


def activation_bytes(shape: ModelShape, *, checkpointing: bool) -> int:
    """Peak activation memory of one batch slice's forward and backward."""
    transient = 2 * shape.largest_saved
    if not checkpointing:
        return shape.saved_outside_blocks + sum(shape.saved_per_block) + transient
    recompute = max(shape.saved_per_block, default=0)  # one block's activations, rebuilt in its backward
    return shape.saved_outside_blocks + sum(shape.block_inputs) + recompute + transient


def _kept_rows(config: RunConfig) -> int:
    from hessian_core.lanczos import _capacity

    return _capacity(config.lanczos.steps, config.lanczos.reorth, config.lanczos.window)


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    rows: list[tuple[str, int]]  # per-rank device memory, (what, bytes)
    total: int  # per rank, device
    loading: int  # host memory per rank while loading
    peak: int  # what must fit: total, or max(total, loading) where host and device are one memory
    checkpoint_per_save: int  # bytes per rank per save
    activations: int
    activations_checkpointed: int
    shape: ModelShape
    config: RunConfig


def memory_plan(config: RunConfig, shape: ModelShape, *, pretrained_file_bytes: int = 0,
                sharded_loading: bool = False) -> MemoryPlan:
    m, cl, lz = config.model, config.cluster, config.lanczos
    master, compute = DTYPE_BYTES[m.dtype], DTYPE_BYTES[m.compute_dtype or m.dtype]
    accumulator, vector = max(master, 4), DTYPE_BYTES[lz.vector_dtype]
    s = shape.local_params
    sharded = cl.num_workers > 1 or compute != master
    act = activation_bytes(shape, checkpointing=False)
    act_ckpt = activation_bytes(shape, checkpointing=True)
    kept = _kept_rows(config)
    rows = [("parameter shard", s * master), ("gradient shard", s * master)]
    if accumulator != master:  # otherwise the HVP's passes accumulate into the gradient shard (hessian_core.hvp)
        rows.append(("FD HVP accumulator", s * accumulator))
    rows += [("FD HVP retained copy", s * master),
             (f"Lanczos vectors ({kept} rows, {lz.vector_dtype})", kept * s * vector)]
    if sharded:
        gathered = (shape.root_params + 2 * shape.block_params) * compute
        unsharded_grads = (shape.root_params + shape.block_params) * (compute + max(master, 4))
        rows.append(("FSDP gathered parameters and unsharded gradients", gathered + unsharded_grads))
    rows.append((f"activations ({config.data.batch_size // cl.num_workers} x {config.data.seq_len}"
                 f"{', checkpointed' if m.activation_checkpointing else ''})",
                 act_ckpt if m.activation_checkpointing else act))
    total = sum(b for _, b in rows)
    # a full load holds the whole model (then its shard); a sharded load (hessian_core.models) only the shard
    loading = (s * master if sharded_loading else
               shape.num_params * master + (s * master if sharded else 0) + pretrained_file_bytes)
    peak = total if cl.use_gpu else max(total, loading)
    return MemoryPlan(rows=rows, total=total, loading=loading, peak=peak,
                      checkpoint_per_save=(kept + 2) * s * vector, activations=act,
                      activations_checkpointed=act_ckpt, shape=shape, config=config)


def training_reference(plan: MemoryPlan) -> int:
    """Per-rank device memory of AdamW training of the same model under the same FSDP2 sharding, compute dtype,
    activation checkpointing and tokens per rank: parameter and gradient shards and AdamW's two moments in the
    master dtype (16 bytes a parameter in float32), the same gathered parameters and activations."""
    s, master = plan.shape.local_params, DTYPE_BYTES[plan.config.model.dtype]
    shared = [b for what, b in plan.rows if what.startswith(("FSDP gathered", "activations"))]
    return 4 * s * master + sum(shared)


def default_ranks_per_node(config: RunConfig) -> int:
    """8 GPUs a node for a GPU run (the usual cluster node); a CPU run's ranks on this one machine."""
    return 8 if config.cluster.use_gpu else config.cluster.num_workers * config.cluster.num_groups


def host_bytes_per_node(plan: MemoryPlan, ranks_per_node: int) -> int:
    """Host memory of one node: each rank's load (the whole model or its shard, see ``memory_plan``) and its
    checkpoint staging (a save's rows are copied to host memory before they are written); on a CPU run host and
    device are one memory, so each rank's whole peak."""
    per_rank = plan.loading + plan.checkpoint_per_save if plan.config.cluster.use_gpu else plan.peak
    return ranks_per_node * per_rank


def _weight_file_bytes(model_path: str | None, init: str) -> int:
    """Bytes of a local pretrained model's weight files (their pages count while loading); 0 otherwise."""
    if init != "pretrained" or not model_path or not os.path.isdir(model_path):
        return 0
    return sum(os.path.getsize(os.path.join(model_path, f)) for f in os.listdir(model_path)
               if f.endswith((".safetensors", ".bin")))


def plan_run(config: RunConfig, *, model_path: str | None = None) -> MemoryPlan:
    """The memory plan of ``config`` (model_path: the resolved model folder, default model.path)."""
    model_path = model_path if model_path is not None else config.model.path
    hf_config(config, model_path)  # a one-line ConfigError where the architecture cannot be read
    from .preflight import spec_for

    spec = spec_for(config, model_path)
    try:
        shape = trace_model(replace(spec, dtype=config.model.compute_dtype or config.model.dtype),
                            world=config.cluster.num_workers,
                            batch=config.data.batch_size // config.cluster.num_workers, seq_len=config.data.seq_len)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model {config.model.path!r}: cannot build it from its config "
                          f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    return memory_plan(config, shape, pretrained_file_bytes=_weight_file_bytes(model_path, config.model.init),
                       sharded_loading=_loads_sharded(spec, world_size=config.cluster.num_workers))


def _loads_sharded(spec, *, world_size: int) -> bool:
    """Whether the ranks will read only their shards (hessian_core.models.choose_loading); False if unknown."""
    from hessian_core.models import choose_loading

    try:
        return choose_loading(spec, world_size=world_size) == "sharded"
    except (ValueError, OSError):
        return False


def _with(config: RunConfig, **sections) -> RunConfig:
    return replace(config, **{k: replace(getattr(config, k), **v) for k, v in sections.items()})


def suggestion(plan: MemoryPlan, device_bytes: int) -> str | None:
    """The first change (in order of least cost) that makes the plan fit, as ``key=value``; None if none does."""
    config, shape = plan.config, plan.shape
    candidates = []
    if not config.model.activation_checkpointing:
        candidates.append(("model.activation_checkpointing=true", _with(config, model={"activation_checkpointing": True})))
    if config.lanczos.vector_dtype != "bfloat16":
        candidates.append(("lanczos.vector_dtype=bfloat16", _with(config, lanczos={"vector_dtype": "bfloat16"})))
    # then the smallest rank count per group that fits, tried in order, each rank keeping its tokens
    per_rank = config.data.batch_size // config.cluster.num_workers
    candidates += [(f"cluster.num_workers={w} data.batch_size={w * per_rank}",
                    _with(config, cluster={"num_workers": w}, data={"batch_size": w * per_rank}))
                   for w in range(config.cluster.num_workers + 1, MAX_SUGGESTED_WORKERS + 1)]
    for text, candidate in candidates:
        if candidate.cluster.num_workers != config.cluster.num_workers:
            w = candidate.cluster.num_workers
            scale = candidate.data.batch_size / w / max(1, config.data.batch_size // config.cluster.num_workers)
            new_shape = replace(shape, local_params=math.ceil(shape.local_params * config.cluster.num_workers / w),
                                saved_outside_blocks=int(shape.saved_outside_blocks * scale),
                                saved_per_block=[int(b * scale) for b in shape.saved_per_block],
                                block_inputs=[int(b * scale) for b in shape.block_inputs],
                                largest_saved=int(shape.largest_saved * scale))
        else:
            new_shape = shape
        if memory_plan(candidate, new_shape).peak <= device_bytes:
            return text
    return None


def verdict(plan: MemoryPlan, device_bytes: int) -> str:
    spare = device_bytes - plan.peak
    if spare >= 0:
        return f"fits with {spare / GIB:.3g} GiB spare ({plan.peak / GIB:.3g} of {device_bytes / GIB:.3g} GiB per rank)"
    fix = suggestion(plan, device_bytes)
    need = f"needs {plan.peak / GIB:.3g} GiB per rank, has {device_bytes / GIB:.3g} GiB"
    return f"does not fit ({need}): set {fix}" if fix else f"does not fit ({need}): use larger devices"


def hvp_count(config: RunConfig, num_blocks: int) -> int:
    """HVPs of the configured probes (SLQ and block analysis); calibration adds 2-6 more once."""
    outside = 1  # the modules outside the transformer blocks form one more block
    blocks = config.blocks.probes * (1 + num_blocks + outside) if config.blocks.enabled else 0
    return config.lanczos.probes * config.lanczos.steps + blocks


def predicted_seconds(config: RunConfig, num_blocks: int, *, grad_seconds: float, measured_with: RunConfig) -> float:
    """Wall time from one gradient's time on an earlier run, scaled by the per-rank work (sequences x
    seq_len per rank); probes are spread over the groups, each probe's HVPs run on one group."""
    passes = 2 if config.hvp.scheme == "central" else 4

    def work(c: RunConfig) -> float:
        return c.data.num_batches * c.data.batch_size / c.cluster.num_workers * c.data.seq_len

    grad = grad_seconds * work(config) / work(measured_with)
    slq = [config.lanczos.steps] * config.lanczos.probes
    blocks = [1 + num_blocks + 1] * (config.blocks.probes if config.blocks.enabled else 0)
    loads = [0.0] * config.cluster.num_groups
    for hvps in sorted(slq + blocks, reverse=True):  # a free group takes the next task
        loads[loads.index(min(loads))] += hvps * passes * grad
    return CALIBRATION_GRADIENTS * grad + max(loads)


def read_grad_seconds(run_dir: str) -> tuple[float, RunConfig]:
    """``timing.grad_seconds`` and the config of an earlier run (``--from RUN_DIR``)."""
    from .config import _build

    from .run_folder import RunFolder

    info = RunFolder(run_dir).info(what="--from ")
    grad = info.grad_seconds
    if not isinstance(grad, (int, float)) or not grad > 0:
        raise ConfigError(f"--from {run_dir!r}: run.json has no timing.grad_seconds (the run ended before timing)")
    return float(grad), _build(RunConfig, info.config, "")


def _size(b: int) -> str:
    return f"{b / GIB:9.2f} GiB" if b >= GIB else f"{b / 2**20:9.2f} MiB"


def format_plan(plan: MemoryPlan, *, device_bytes: int | None, grad: tuple[float, RunConfig] | None) -> str:
    c, shape = plan.config, plan.shape
    lines = [f"model: {shape.num_params:,} parameters, {shape.num_blocks} blocks; {c.cluster.num_groups} group(s) "
             f"x {c.cluster.num_workers} rank(s); {c.model.dtype} master, {c.model.compute_dtype or c.model.dtype} compute",
             "per rank:"]
    lines += [f"  {what:<58}{_size(b)}" for what, b in plan.rows]
    lines.append(f"  {'total':<58}{_size(plan.total)}")
    lines.append(f"  {'reference: AdamW training, same sharding and activations':<58}{_size(training_reference(plan))}")
    lines.append(f"  {'activations without / with activation checkpointing':<58}{_size(plan.activations)} / "
                 f"{_size(plan.activations_checkpointed).strip()}")
    lines.append(f"  {'host memory while loading':<58}{_size(plan.loading)}")
    lines.append(f"  {'checkpoint per save (all ranks: x' + str(c.cluster.num_workers) + ')':<58}"
                 f"{_size(plan.checkpoint_per_save)}")
    count = hvp_count(c, shape.num_blocks)
    lines.append(f"HVPs: {count:,} ({c.lanczos.probes} probes x {c.lanczos.steps} steps"
                 + (f" + {c.blocks.probes} block probes" if c.blocks.enabled else "") + ") + 2-6 for eps")
    if grad is not None:
        secs = predicted_seconds(c, shape.num_blocks, grad_seconds=grad[0], measured_with=grad[1])
        lines.append(f"predicted wall time: {secs:,.0f} s ({secs / 3600:.2f} h) from grad_seconds={grad[0]:.4g}")
    if device_bytes is not None:
        lines.append(f"verdict: {verdict(plan, device_bytes)}")
    return "\n".join(lines)


def default_device_bytes(config: RunConfig) -> int | None:
    """This machine's memory per rank when no --device-memory is given: the GPU's, or host RAM / ranks here."""
    if config.cluster.use_gpu:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if config.cluster.address is not None:
        return None  # the ranks run elsewhere
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // (config.cluster.num_workers * config.cluster.num_groups)


def plan_command(config: RunConfig, *, device_memory: str | None, from_run: str | None,
                 host_memory: str | None = None, ranks_per_node: int | None = None) -> str:
    """What ``hessian-spectrum plan`` prints. A GPU run planned on a machine without one needs ``device_memory``
    (the GPU you will rent); ``host_memory`` (per node) adds a verdict on the nodes' host memory."""
    if device_memory is None and config.cluster.use_gpu and config.cluster.address is None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("plan: cluster.use_gpu=true and this machine has no GPU: pass --device-memory, the "
                              "memory of one GPU of the cluster (e.g. 80GiB)")
    if ranks_per_node is not None and ranks_per_node < 1:
        raise ConfigError(f"plan: --ranks-per-node must be at least 1, got {ranks_per_node}")
    device_bytes = parse_size(device_memory) if device_memory is not None else default_device_bytes(config)
    host_bytes = parse_size(host_memory) if host_memory is not None else None
    grad = read_grad_seconds(from_run) if from_run else None
    plan = plan_run(config)
    text = format_plan(plan, device_bytes=device_bytes, grad=grad)
    if device_bytes is None:
        text += "\nverdict: none (pass --device-memory, e.g. 80GiB)"
    ranks = ranks_per_node or default_ranks_per_node(config)
    node = host_bytes_per_node(plan, ranks)
    text += f"\nhost memory per node ({ranks} ranks): {_size(node).strip()}"
    if host_bytes is not None:
        spare = host_bytes - node
        # only pretrained weights can be read shard by shard; a random init builds the whole model on each rank
        loads_whole = plan.loading > plan.shape.local_params * DTYPE_BYTES[config.model.dtype]
        fix = ("set model.loading=sharded or use fewer ranks per node"
               if config.model.init == "pretrained" and loads_whole else "use fewer ranks per node")
        text += (f" - fits with {spare / GIB:.3g} GiB spare" if spare >= 0 else
                 f" - does not fit in {host_bytes / GIB:.3g} GiB: {fix}")
    return text


def verdict_line(config: RunConfig, *, model_path: str | None) -> str:
    """The plan's one-line verdict that ``run`` prints at start, against this machine's memory per rank (or
    the GPU's); never fails the run: a model the plan cannot trace says so instead."""
    try:
        device_bytes = default_device_bytes(config)
        plan = plan_run(config, model_path=model_path)
    except Exception as e:  # noqa: BLE001 - the plan is advice; the run itself reports real problems
        return f"plan: unavailable ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    if device_bytes is None:
        return f"plan: {plan.peak / GIB:.3g} GiB per rank (device memory unknown here; see hessian-spectrum plan)"
    return f"plan: {verdict(plan, device_bytes)}"
