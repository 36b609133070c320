"""``hessian-spectrum plan CONFIG``: per-rank memory, HVP count and wall time of a run, before launching it.

No Ray, no weights: the model is built from its config under torch's FakeTensorMode (shapes and dtypes, no
storage), which gives the parameter count, the FSDP2 shard sizes and, by running the loss forward on fake
inputs with a saved-tensors hook, the bytes autograd keeps for the backward: the activation estimate, per
transformer block (so the same trace gives the figure with activation checkpointing).

Per rank, with S the largest local shard (FSDP2 pads dim 0 to a multiple of the ranks):
- parameter shard, gradient shard, the FD HVP's retained copy: S x the master dtype each;
- the FD HVP's accumulator, S x float32, only for a bfloat16 master: otherwise the HVP's gradient passes
  accumulate into the gradient shard itself;
- ``hvp.scheme: forward``: the gradient at theta it keeps for every HVP, S x the accumulator dtype (the float32
  or float64 of the accumulator);
- Lanczos vectors: the rows ``lanczos`` keeps (``window`` for reorth=window, all steps + 1 for full, 2 for
  none) x S x ``lanczos.vector_dtype``; with ``lanczos.vectors: host`` they are host memory, and the device
  holds the newest vector and the rows streamed through it (2 on a GPU, 1 on CPU: ``hessian_core.lanczos``);
  with ``hvp.restore: host`` the FD HVP's retained copy is host memory too. ``auto`` (either key) takes the
  first placement that fits, in order of the PCIe traffic it adds (``AUTO_ORDER``);
- the eigen task (``eigen.k`` > 0): its basis + 1 vectors and the k results it copies out (or the restart's
  rotation buffer if larger), in float64 for a float64 model, else float32; a group runs one task at a time, so
  the row counts only what it holds beyond a probe's Lanczos vectors (its saved states are counted in the
  checkpoint per save where they are larger than a probe's);
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
is the larger of the two, and offloaded rows count in the total. Checkpoints stage the kept Lanczos rows
(plus 2) per save in host memory before writing them. A GPU node's host memory per rank is the larger of
the load and what the analysis holds there afterwards (offloaded rows and checkpoint staging): the load's
full model is freed once the rank holds its shard, before the first Lanczos vector exists.
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
GRADIENT_PASSES = {"central": 2, "richardson": 4, "forward": 1}  # per HVP (forward: its gradient at theta is kept)


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
    vocab: int = 0  # the logits' width (the Gauss-Newton operator's buffers)
    logits_saved: int = 0  # bytes of the saved tensors of tokens x vocab size (the loss's), in saved_outside_blocks
    largest_saved_besides_logits: int = 0


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


def _traced_dtype(cfg, compute_dtype: str) -> tuple[str, float]:
    """(the dtype to trace in, the factor from its saved bytes to the compute dtype's). A mixture of experts is
    traced in bfloat16: its float32/float64 expert kernels route tokens by data-dependent indexing, which fake
    tensors cannot run, while the grouped kernel takes only the routed tokens of each expert (as the real run
    does) but has fake-tensor support in bfloat16 only. Its saved bytes are scaled back (index tensors too: a
    slight overestimate)."""
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    if experts > 1 and compute_dtype != "bfloat16":
        return "bfloat16", DTYPE_BYTES[compute_dtype] / DTYPE_BYTES["bfloat16"]
    return compute_dtype, 1.0


def trace_model(spec, *, world: int, batch: int, seq_len: int) -> ModelShape:
    """Build ``spec``'s model on fake tensors (in ``spec.dtype``: the compute dtype; a mixture of experts in
    bfloat16, ``_traced_dtype``) and run the analysis loss forward on a fake ``[batch, seq_len]`` batch."""
    import torch

    from hessian_core import causal_lm_loss, transformer_blocks
    from hessian_core.models import build, fake_mode

    saved: dict[int, tuple[int, str]] = {}  # storage -> (bytes, owner: a block index or "outside")
    keep_alive = []  # storages stay referenced so their addresses are not reused during the trace
    current = ["outside"]
    inputs: list[int] = []
    from hessian_core.models import hf_config as architecture

    traced, scale = _traced_dtype(architecture(spec), spec.dtype)
    vocab = int(getattr(architecture(spec), "vocab_size", 0) or 0)
    logits_sized: set[int] = set()  # storages of tokens x vocab elements or more: the logits and the loss's
    model = build(replace(spec, dtype=traced), device="fake", for_analysis=False)
    with fake_mode(model), _no_packed_sequences():
        params = {id(p): p for p in model.parameters()}.values()
        param_storages = {p.untyped_storage()._cdata for p in params}
        blocks = transformer_blocks(model)

        def enter(index):
            def hook(module, args, kwargs):
                current[0] = index
                hidden = args[0] if args else kwargs.get("hidden_states")
                inputs.append(int(hidden.untyped_storage().nbytes() * scale) if hidden is not None else 0)
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
                saved[key] = (int(storage.nbytes() * scale), current[0])
                keep_alive.append(storage)
                if vocab and t.numel() >= batch * (seq_len - 1) * vocab:
                    logits_sized.add(key)
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
                      largest_saved=max((b for b, _ in saved.values()), default=0), vocab=vocab,
                      logits_saved=sum(saved[key][0] for key in logits_sized),
                      largest_saved_besides_logits=max((b for key, (b, _) in saved.items() if key not in logits_sized),
                                                       default=0))


def activation_bytes(shape: ModelShape, *, checkpointing: bool, without_loss: bool = False) -> int:
    """Peak activation memory of one batch slice's forward and backward; ``without_loss``: of a pass that
    backpropagates from the logits (the Gauss-Newton product's), which saves none of the loss's tokens x vocab
    tensors."""
    outside = shape.saved_outside_blocks - (shape.logits_saved if without_loss else 0)
    transient = 2 * (shape.largest_saved_besides_logits if without_loss else shape.largest_saved)
    if not checkpointing:
        return outside + sum(shape.saved_per_block) + transient
    recompute = max(shape.saved_per_block, default=0)  # one block's activations, rebuilt in its backward
    return outside + sum(shape.block_inputs) + recompute + transient


# auto placements, (lanczos.vectors, hvp.restore), in order of the PCIe traffic they add per HVP: a host restore
# copy moves 3 parameter shards (the save and two restores: 12 bytes a float32 parameter), a host window its rows
# about twice (the dots and the subtraction: 30 bytes a parameter for 8 bfloat16 rows)
AUTO_ORDER = (("device", "device"), ("device", "host"), ("host", "device"), ("host", "host"))


def _kept_rows(config: RunConfig) -> int:
    from hessian_core.lanczos import _capacity

    return _capacity(config.lanczos.step_budget, config.lanczos.reorth, config.lanczos.window)


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    rows: list[tuple[str, int]]  # per-rank device memory, (what, bytes)
    host_rows: list[tuple[str, int]]  # per-rank host memory the analysis holds (offloaded vectors, restore copy)
    total: int  # per rank, device (and the host rows too on a CPU run, where they are one memory)
    loading: int  # host memory per rank while loading
    peak: int  # what must fit: total, or max(total, loading) where host and device are one memory
    checkpoint_per_save: int  # bytes per rank per save
    activations: int
    activations_checkpointed: int
    shape: ModelShape
    config: RunConfig  # with lanczos.vectors and hvp.restore resolved (never auto)
    auto: tuple[str, ...] = ()  # the keys whose value auto chose

    @property
    def host_resident(self) -> int:
        return sum(b for _, b in self.host_rows)


def memory_plan(config: RunConfig, shape: ModelShape, *, pretrained_file_bytes: int = 0,
                sharded_loading: bool = False) -> MemoryPlan:
    """The plan of ``config``, whose lanczos.vectors and hvp.restore are device or host (``plan_run`` resolves
    auto)."""
    m, cl, lz = config.model, config.cluster, config.lanczos
    if "auto" in (lz.vectors, config.hvp.restore):
        raise ValueError("memory_plan needs lanczos.vectors and hvp.restore resolved (plan_run resolves auto)")
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
    if config.hvp.scheme == "forward":  # grad L(theta), kept for every HVP (FiniteDifferenceHVP._base_gradient)
        rows.append(("FD HVP forward scheme: the kept gradient at theta", s * accumulator))
    placed = _placed_rows(config, s, master=master, vector=vector, kept=kept)
    rows += [(what, b) for what, b in placed if not what.endswith("(host)")]
    host_rows = [(what, b) for what, b in placed if what.endswith("(host)")]
    if config.eigen.k:  # the eigen task runs instead of a probe on its group: the larger of the two counts
        lanczos = sum(b for what, b in rows if what.startswith("Lanczos vectors"))
        basis, held = eigen_bytes(config, s, shape.num_params)
        rows.append((f"eigenpairs: {basis} + 1 basis and {config.eigen.k} result rows, beyond the Lanczos rows",
                     max(0, held - lanczos)))
    rows += _study_rows(config, shape, s)
    if sharded:
        gathered = (shape.root_params + 2 * shape.block_params) * compute
        unsharded_grads = (shape.root_params + shape.block_params) * (compute + max(master, 4))
        rows.append(("FSDP gathered parameters and unsharded gradients", gathered + unsharded_grads))
    rows.append((f"activations ({config.data.batch_size // cl.num_workers} x {config.data.seq_len}"
                 f"{', checkpointed' if m.activation_checkpointing else ''})",
                 act_ckpt if m.activation_checkpointing else act))
    total = sum(b for _, b in rows) + (0 if cl.use_gpu else sum(b for _, b in host_rows))
    # a full load holds the whole model (then its shard); a sharded load (hessian_core.models) only the shard
    loading = (s * master if sharded_loading else
               shape.num_params * master + (s * master if sharded else 0) + pretrained_file_bytes)
    peak = total if cl.use_gpu else max(total, loading)
    return MemoryPlan(rows=rows, host_rows=host_rows, total=total, loading=loading, peak=peak,
                      checkpoint_per_save=max((kept + 2) * s * vector, eigen_save_bytes(config, s, shape.num_params)),
                      activations=act,
                      activations_checkpointed=act_ckpt, shape=shape, config=config)


def uses_gauss_newton(config: RunConfig) -> bool:
    return config.lanczos.operator != "hessian" or "gauss_newton" in config.blocks.approximations


def _study_rows(config: RunConfig, shape: ModelShape, s: int) -> list[tuple[str, int]]:
    """The Gauss-Newton operator's own restore copy and what its product holds beyond a gradient pass's peak, and
    the approximation study's eigenvectors (kept by the group for all its probes) with one solver's basis."""
    from hessian_core.approximations import lowrank_ranks
    from hessian_core.eigen import default_basis

    rows = []
    if uses_gauss_newton(config):
        extra = gauss_newton_peak(config, shape) - activation_bytes(
            shape, checkpointing=config.model.activation_checkpointing)
        rows.append(("Gauss-Newton: its restore copy, and J v logits beyond a gradient's peak",
                     s * DTYPE_BYTES[config.model.dtype] + max(0, extra)))
    ranks = lowrank_ranks(config.blocks.approximations)
    if ranks:
        element = 8 if config.model.dtype == "float64" else 4
        largest = max(ranks.values())
        held = sum(ranks.values()) + min(default_basis(largest), shape.num_params) + 1
        rows.append((f"approximation study: {sum(ranks.values())} eigenvectors kept and one solver's basis",
                     held * s * element))
    return rows


def gauss_newton_peak(config: RunConfig, shape: ModelShape) -> int:
    """Bytes one G v holds at its peak on a rank (hessian_core.gauss_newton), activations included: the forward at
    theta saves the model's activations but not the loss's tokens x vocab tensors (it backpropagates from the
    logits), and the product adds one batch slice's J v buffer, its logits and a softmax chunk. Measured on a
    50k-vocabulary model: within 1% (tests/core/test_gauss_newton_memory.py)."""
    import torch

    from hessian_core.gauss_newton import DEFAULT_CHUNK_TOKENS, gauss_newton_extra_bytes

    tokens = config.data.batch_size // config.cluster.num_workers * config.data.seq_len
    compute = getattr(torch, config.model.compute_dtype or config.model.dtype)
    extra = gauss_newton_extra_bytes(tokens_per_batch=tokens, vocab=max(shape.vocab, 1),
                                     chunk_tokens=DEFAULT_CHUNK_TOKENS, dtype=compute)
    return activation_bytes(shape, checkpointing=config.model.activation_checkpointing, without_loss=True) + extra


def _eigen_shape(config: RunConfig, num_params: int) -> tuple[int, int, int]:
    """(basis, kept vectors after a restart, bytes per element) of the eigen task (hessian_core.eigen): float64
    vectors for a float64 model, else float32 (pipeline.run.driver.eigen_task)."""
    from hessian_core.eigen import default_basis, kept_vectors

    k = config.eigen.k
    basis = min(config.eigen.basis or default_basis(k), num_params)
    return basis, kept_vectors(k, basis), 8 if config.model.dtype == "float64" else 4


def eigen_bytes(config: RunConfig, s: int, num_params: int) -> tuple[int, int]:
    """(basis, bytes per rank) of the eigen task's vectors at their peak, with ``s`` elements a row: the basis
    and the next vector, plus the larger of the k results copied out at the end and the restart's rotation
    buffer (kept vectors x one column chunk)."""
    from hessian_core.eigen import ROTATION_CHUNK

    basis, kept, element = _eigen_shape(config, num_params)
    return basis, ((basis + 1) * s + max(config.eigen.k * s, kept * min(ROTATION_CHUNK, s))) * element


def eigen_save_bytes(config: RunConfig, s: int, num_params: int) -> int:
    """Bytes per rank of one saved eigen state (after a restart: the kept vectors and the next one); 0 without
    the eigen task."""
    if not config.eigen.k:
        return 0
    _, kept, element = _eigen_shape(config, num_params)
    return (kept + 1) * s * element


def _placed_rows(config: RunConfig, s: int, *, master: int, vector: int, kept: int) -> list[tuple[str, int]]:
    """The restore copy and the Lanczos vectors where ``config`` puts them; host memory is labelled "(host)"."""
    from hessian_core.lanczos import STAGING_ROWS

    lz = config.lanczos
    restore = ("FD HVP retained copy" + (" (host)" if config.hvp.restore == "host" else ""), s * master)
    if lz.vectors == "device":
        return [restore, (f"Lanczos vectors ({kept} rows, {lz.vector_dtype})", kept * s * vector)]
    streamed = 1 + STAGING_ROWS["cuda" if config.cluster.use_gpu else "cpu"]  # the newest and the streamed rows
    return [restore, (f"Lanczos vectors: newest + {streamed - 1} streamed ({lz.vector_dtype})", streamed * s * vector),
            (f"Lanczos vectors ({kept} rows, {lz.vector_dtype}) (host)", kept * s * vector)]


def _placed(config: RunConfig, vectors: str, restore: str) -> RunConfig:
    return _with(config, lanczos={"vectors": vectors}, hvp={"restore": restore})


def placed_plan(config: RunConfig, shape: ModelShape, device_bytes: int | None, **loading) -> MemoryPlan:
    """The plan with ``auto`` resolved as a run resolves it: the first placement in ``AUTO_ORDER`` (among those
    the config leaves open) whose peak fits ``device_bytes``, else the one with the smallest peak (on a CPU run
    host and device are one memory: device); device where ``device_bytes`` is unknown."""
    lz, hvp = config.lanczos, config.hvp
    auto = tuple(k for k, v in (("lanczos.vectors", lz.vectors), ("hvp.restore", hvp.restore)) if v == "auto")
    plans = [memory_plan(_placed(config, v, r), shape, **loading) for v, r in AUTO_ORDER
             if lz.vectors in ("auto", v) and hvp.restore in ("auto", r)]
    fitting = [p for p in plans if device_bytes is not None and p.peak <= device_bytes]
    chosen = plans[0] if device_bytes is None else (fitting or sorted(plans, key=lambda p: p.peak))[0]
    return replace(chosen, auto=auto)


def placement_line(plan: MemoryPlan) -> str:
    """``lanczos.vectors=host (auto), hvp.restore=device``: where the plan (and a run) keeps them."""
    values = (("lanczos.vectors", plan.config.lanczos.vectors), ("hvp.restore", plan.config.hvp.restore))
    return ", ".join(f"{k}={v}" + (" (auto)" if k in plan.auto else "") for k, v in values)


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


def host_bytes_per_rank(plan: MemoryPlan) -> int:
    """Host memory of one rank: the larger of its load (the whole model or its shard, see ``memory_plan``) and
    what the analysis holds there afterwards, its offloaded rows and its checkpoint staging (a save's rows are
    copied to host memory before they are written); on a CPU run host and device are one memory: its peak."""
    if not plan.config.cluster.use_gpu:
        return plan.peak
    return max(plan.loading, plan.host_resident + plan.checkpoint_per_save)


def host_bytes_per_node(plan: MemoryPlan, ranks_per_node: int) -> int:
    return ranks_per_node * host_bytes_per_rank(plan)


def _weight_file_bytes(model_path: str | None, init: str) -> int:
    """Bytes of a local pretrained model's weight files (their pages count while loading); 0 otherwise."""
    if init != "pretrained" or not model_path or not os.path.isdir(model_path):
        return 0
    return sum(os.path.getsize(os.path.join(model_path, f)) for f in os.listdir(model_path)
               if f.endswith((".safetensors", ".bin")))


def plan_run(config: RunConfig, *, model_path: str | None = None, device_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of ``config`` (model_path: the resolved model folder, default model.path), its ``auto``
    placements resolved against ``device_bytes`` per rank (``placed_plan``)."""
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
    return placed_plan(config, shape, device_bytes,
                       pretrained_file_bytes=_weight_file_bytes(model_path, config.model.init),
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
    """The first change (in order of least cost) that makes the plan fit, as ``key=value``; None if none does.
    Moving the restore copy or the Lanczos vectors to host memory costs PCIe traffic only, so it comes first;
    then activation checkpointing (one more forward per gradient), bfloat16 vectors, and last the smallest rank
    count per group that fits (each rank keeping its tokens, with the placements ``auto`` would choose there)."""
    config, shape = plan.config, plan.shape
    candidates = []
    now = {"lanczos.vectors": config.lanczos.vectors, "hvp.restore": config.hvp.restore}
    for v, r in AUTO_ORDER[1:]:
        want = {"lanczos.vectors": v, "hvp.restore": r}
        if all(want[k] == "host" or now[k] == "device" for k in now):  # never moves something back to the device
            changes = [f"{k}=host" for k in now if want[k] == "host" and now[k] != "host"]
            if changes:
                candidates.append((" ".join(changes), _placed(config, v, r)))
    if not config.model.activation_checkpointing:
        candidates.append(("model.activation_checkpointing=true", _with(config, model={"activation_checkpointing": True})))
    if config.lanczos.vector_dtype != "bfloat16":
        candidates.append(("lanczos.vector_dtype=bfloat16", _with(config, lanczos={"vector_dtype": "bfloat16"})))
    for text, candidate in candidates:
        if placed_plan(candidate, shape, device_bytes).peak <= device_bytes:
            return text
    return _fitting_rank_count(plan, device_bytes)


def _fitting_rank_count(plan: MemoryPlan, device_bytes: int) -> str | None:
    """``cluster.num_workers=W data.batch_size=...`` for the smallest W that fits, with auto placements open."""
    config, shape = plan.config, plan.shape
    open_places = _with(config, lanczos={"vectors": "auto" if "lanczos.vectors" in plan.auto else config.lanczos.vectors},
                        hvp={"restore": "auto" if "hvp.restore" in plan.auto else config.hvp.restore})
    per_rank = config.data.batch_size // config.cluster.num_workers
    for w in range(config.cluster.num_workers + 1, MAX_SUGGESTED_WORKERS + 1):
        candidate = _with(open_places, cluster={"num_workers": w}, data={"batch_size": w * per_rank})
        new_shape = replace(shape, local_params=math.ceil(shape.local_params * config.cluster.num_workers / w))
        fitted = placed_plan(candidate, new_shape, device_bytes)
        if fitted.peak <= device_bytes:
            placed = [f"{k}={v}" for k, v in (("lanczos.vectors", fitted.config.lanczos.vectors),
                                               ("hvp.restore", fitted.config.hvp.restore))
                      if v == "host" and k in plan.auto]
            return f"cluster.num_workers={w} data.batch_size={w * per_rank}" + (
                f" (with {', '.join(placed)})" if placed else "")
    return None


def verdict(plan: MemoryPlan, device_bytes: int) -> str:
    spare = device_bytes - plan.peak
    if spare >= 0:
        return f"fits with {spare / GIB:.3g} GiB spare ({plan.peak / GIB:.3g} of {device_bytes / GIB:.3g} GiB per rank)"
    fix = suggestion(plan, device_bytes)
    need = f"needs {plan.peak / GIB:.3g} GiB per rank, has {device_bytes / GIB:.3g} GiB"
    return f"does not fit ({need}): set {fix}" if fix else f"does not fit ({need}): use larger devices"


def eigen_hvps(config: RunConfig) -> int:
    """The eigen task's HVPs at most: the solver's budget and 2 a pair for the FD bars (0 without it)."""
    return config.eigen.max_hvps + 2 * config.eigen.k if config.eigen.k else 0


def landscape_forwards(config: RunConfig) -> int:
    """Forward passes of the eigen task's landscape slices (0 without it)."""
    if not config.eigen.k:
        return 0
    grid = config.eigen.landscape
    return grid.points_1d + (grid.points_2d ** 2 if config.eigen.k >= 2 else 0)


def hvp_count(config: RunConfig, num_blocks: int) -> int:
    """HVPs of the configured probes (SLQ and block analysis) and, at most, of the eigen task; calibration adds
    2-6 more once."""
    outside = 1  # the modules outside the transformer blocks form one more block
    blocks = config.blocks.probes * (1 + num_blocks + outside) if config.blocks.enabled else 0
    lz = config.lanczos
    return (lz.probe_budget * lz.step_budget * OPERATOR_HVPS[lz.operator] + blocks
            + eigen_hvps(config) + approximation_hvps(config, num_blocks + outside))


OPERATOR_HVPS = {"hessian": 1, "gauss_newton": 0, "residual": 1}  # FD HVPs per SLQ step (G v is counted apart)


def approximation_hvps(config: RunConfig, num_blocks: int) -> int:
    """FD HVPs of the approximation study, at most: per probe the whole H v and one per block for each of the
    block-diagonal and block-tridiagonal parts (block_diagonal_plus_lowrank needs the former), and per group
    the low-rank solves' budgets (a matvec of H - B costs 1 + num_blocks HVPs). Gauss-Newton products, one a
    probe, are counted apart."""
    from hessian_core.approximations import lowrank_ranks, parse_approximation

    names = config.blocks.approximations
    if not names:
        return 0
    kinds = {parse_approximation(n)[0] for n in names}
    per_probe = (1 + num_blocks * (bool(kinds & {"block_diagonal", "block_diagonal_plus_lowrank"})
                                   + ("block_tridiagonal" in kinds)))
    ranks = lowrank_ranks(names)
    solves = (config.eigen.max_hvps * ("lowrank" in ranks)
              + config.eigen.max_hvps * (1 + num_blocks) * ("block_diagonal_plus_lowrank" in ranks))
    return config.blocks.probes * per_probe + solves * config.cluster.num_groups


def gauss_newton_products(config: RunConfig) -> int:
    """G v products: every SLQ step on gauss_newton or residual, and one a probe of the approximation study."""
    lz = config.lanczos
    slq = lz.probe_budget * lz.step_budget if lz.operator != "hessian" else 0
    return slq + (config.blocks.probes if "gauss_newton" in config.blocks.approximations else 0)


def predicted_seconds(config: RunConfig, num_blocks: int, *, grad_seconds: float, measured_with: RunConfig) -> float:
    """Wall time from one gradient's time on an earlier run, scaled by the per-rank work (sequences x
    seq_len per rank); probes are spread over the groups, each probe's HVPs run on one group."""
    passes = GRADIENT_PASSES[config.hvp.scheme]

    def work(c: RunConfig) -> float:
        return c.data.num_batches * c.data.batch_size / c.cluster.num_workers * c.data.seq_len

    grad = grad_seconds * work(config) / work(measured_with)
    slq = [config.lanczos.step_budget] * config.lanczos.probe_budget
    blocks = [1 + num_blocks + 1] * (config.blocks.probes if config.blocks.enabled else 0)
    loads = [0.0] * config.cluster.num_groups
    if config.eigen.k:  # queued first (its budget spent, a forward a third of a gradient, and one gradient)
        loads[0] += eigen_hvps(config) * passes * grad + (landscape_forwards(config) / 3 + 1) * grad
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
             f"placement: {placement_line(plan)}",
             "per rank:"]
    lines += [f"  {what:<58}{_size(b)}" for what, b in plan.rows]
    if not c.cluster.use_gpu:  # one memory: the host rows are part of the total
        lines += [f"  {what:<58}{_size(b)}" for what, b in plan.host_rows]
    lines.append(f"  {'total':<58}{_size(plan.total)}")
    lines.append(f"  {'reference: AdamW training, same sharding and activations':<58}{_size(training_reference(plan))}")
    lines.append(f"  {'activations without / with activation checkpointing':<58}{_size(plan.activations)} / "
                 f"{_size(plan.activations_checkpointed).strip()}")
    lines.append(f"  {'host memory while loading':<58}{_size(plan.loading)}")
    if c.cluster.use_gpu:
        lines += [f"  {what:<58}{_size(b)}" for what, b in plan.host_rows]
    lines.append(f"  {'checkpoint per save (all ranks: x' + str(c.cluster.num_workers) + ')':<58}"
                 f"{_size(plan.checkpoint_per_save)}")
    count = hvp_count(c, shape.num_blocks)
    auto = " (at most: auto)" if "auto" in (c.lanczos.probes, c.lanczos.steps) else ""
    lines.append(f"HVPs{auto}: {count:,} ({c.lanczos.probe_budget} probes x {c.lanczos.step_budget} steps"
                 + (f" + {c.blocks.probes} block probes" if c.blocks.enabled else "")
                 + (f" + up to {eigen_hvps(c)} for the top {c.eigen.k} eigenpairs, and {landscape_forwards(c)} "
                    f"landscape forwards" if c.eigen.k else "")
                 + (f" + up to {approximation_hvps(c, shape.num_blocks + 1):,} for {c.blocks.probes} approximation "
                    f"probes" if c.blocks.approximations else "") + ") + 2-6 for eps"
                 + (f"; Gauss-Newton products: {gauss_newton_products(c):,} (each 3 forwards and a backward)"
                    if uses_gauss_newton(c) else ""))
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
    plan = plan_run(config, device_bytes=device_bytes)
    text = format_plan(plan, device_bytes=device_bytes, grad=grad)
    if device_bytes is None:
        text += "\nverdict: none (pass --device-memory, e.g. 80GiB)"
    return text + "\n" + _host_memory_line(plan, ranks_per_node or default_ranks_per_node(config), host_bytes)


def _host_memory_line(plan: MemoryPlan, ranks: int, host_bytes: int | None) -> str:
    """``host memory per node (R ranks): ...``, with its verdict against ``host_bytes`` where given."""
    config = plan.config
    node = host_bytes_per_node(plan, ranks)
    text = f"host memory per node ({ranks} ranks): {_size(node).strip()}"
    if config.cluster.use_gpu:
        held = plan.host_resident + plan.checkpoint_per_save
        text += (f" = {ranks} x max(loading {_size(plan.loading).strip()}, offloaded + checkpoint staging "
                 f"{_size(held).strip()})")
    if host_bytes is None:
        return text
    if host_bytes >= node:
        return text + f" - fits with {(host_bytes - node) / GIB:.3g} GiB spare"
    # only pretrained weights can be read shard by shard; a random init builds the whole model on each rank
    loads_whole = plan.loading > plan.shape.local_params * DTYPE_BYTES[config.model.dtype]
    fewer = host_bytes // max(1, host_bytes_per_rank(plan))
    fewer = f"use at most {fewer} ranks per node" if fewer >= 1 else "use nodes with more host memory"
    fix = f"set model.loading=sharded or {fewer}" if config.model.init == "pretrained" and loads_whole else fewer
    return text + f" - does not fit in {host_bytes / GIB:.3g} GiB: {fix}"


def verdict_line(config: RunConfig, *, model_path: str | None) -> str:
    """The plan's one-line verdict that ``run`` prints at start, against this machine's memory per rank (or
    the GPU's); never fails the run: a model the plan cannot trace says so instead."""
    return run_plan(config, model_path=model_path)[0]


def run_plan(config: RunConfig, *, model_path: str | None) -> tuple[str, MemoryPlan | None]:
    """(the verdict line, the plan or None where it is unavailable) that ``run`` takes its placements from."""
    try:
        device_bytes = default_device_bytes(config)
        plan = plan_run(config, model_path=model_path, device_bytes=device_bytes)
    except Exception as e:  # noqa: BLE001 - the plan is advice; the run itself reports real problems
        return (f"plan: unavailable ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                None)
    if device_bytes is None:
        return f"plan: {plan.peak / GIB:.3g} GiB per rank (device memory unknown here; see hessian-spectrum plan)", plan
    return f"plan: {verdict(plan, device_bytes)}", plan
