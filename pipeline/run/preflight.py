"""Everything that can be refused before Ray starts or a model is loaded: paths, data, sizes, vocab, output_dir,
the cluster address. ``preflight`` turns a validated config into a ``Prepared`` run (the analysis batches read)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace

import torch

from . import demo
from .config import ConfigError, RunConfig, first_difference, results_part
from hessian_core.loss import BatchSet, counted_tokens

from .data import analysis_set, looks_local, read_sequences
from .progress import log
from .run_folder import RunFolder, RunInfo
from .sanity import check_context, check_token_statistics, check_weight_files
from .tables import writable_folder



@dataclass
class Prepared:
    config: RunConfig
    model_path: str | None
    batches: torch.Tensor | BatchSet  # [num_batches, batch_size, seq_len] input_ids, or with masks/labels
    # cores (torch threads) per rank when a sweep shares a local Ray's cores among its points; None: the config's
    cpus_per_worker: int | None = None
    num_params: int | None = None  # counted by the preflight where it needed the count (eigen.k), else by the run

    def worker_cpus(self) -> int:
        return self.cpus_per_worker or self.config.cpus_per_worker()


def check_output_dir(config: RunConfig, *, fresh: bool) -> None:
    out = config.output_dir
    writable_folder(out, what="output_dir")
    folder = RunFolder(out)
    folder.remove_temporaries()
    if folder.holds_sweep() and not fresh:
        raise ConfigError(f"output_dir {out!r} holds a sweep; use another output_dir for a single run")
    if folder.has_run() and not fresh:
        info = folder.read_info()
        previous = (info.config or None) if info is not None else None
        if previous is None or results_part(previous) != config.result_dict():
            what = (first_difference(results_part(previous), config.result_dict()) if previous is not None
                    else "its run.json holds no readable config")
            raise ConfigError(f"output_dir {out!r} holds a run with a different config ({what}); use another "
                              f"output_dir or pass --fresh to replace it")
    if fresh:
        folder.clear()


def finished_run(config: RunConfig) -> RunInfo | None:
    """run.json of a complete run of this config in its output_dir (rerunning it is a no-op), else None."""
    info = RunFolder(config.output_dir).read_info()
    if info is None:
        return None
    same = bool(info.config) and results_part(info.config) == config.result_dict()
    return info if same and info.status == "complete" else None


def preflight(config: RunConfig, *, fresh: bool = False) -> Prepared:
    """Everything that can be refused before Ray starts or a model is loaded: paths, data, sizes, vocab."""
    model_path = config.model.path
    data_path = config.data.path
    if model_path == demo.DEMO or data_path == demo.DEMO:
        demo_model, demo_data = demo.ensure_demo(log)
        model_path = demo_model if model_path == demo.DEMO else model_path
        data_path = demo_data if data_path == demo.DEMO else data_path
    arch_path = model_path  # the folder with config.json and the tokenizer
    if model_path and looks_local(model_path):
        from hessian_core.models import checkpoint_format

        if not os.path.isdir(model_path):
            raise ConfigError(f"model.path {model_path!r} does not exist (expected a local model folder or hub id)")
        if checkpoint_format(model_path) == "dcp":
            arch_path = _check_dcp(config, model_path)
        elif not os.path.exists(os.path.join(model_path, "config.json")):
            raise ConfigError(f"model.path {model_path!r} has no config.json; it is not a Hugging Face model folder")
        elif config.model.init == "pretrained" and not _has_weights(model_path):
            from hessian_core.models import WEIGHT_FILES

            raise ConfigError(f"model.path {model_path!r} has no weights ({', '.join(WEIGHT_FILES)}); "
                              f"set model.init=random to analyse random weights")
        elif config.model.init == "pretrained":
            check_weight_files(model_path)
            if checkpoint_format(model_path) == "safetensors":
                _check_keys(config, model_path)
    if config.model.loading != "auto":
        from hessian_core.models import choose_loading

        try:
            choose_loading(spec_for(config, model_path), world_size=config.cluster.num_workers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    hf_config = _hf_config(config, model_path)
    if hf_config is not None:
        check_context(hf_config, config.data.seq_len)
    data = config.data
    if data_path != data.path:
        data = replace(data, path=data_path)
    sequences = read_sequences(data, tokenizer_path=arch_path, revision=config.model.revision)
    batches = analysis_set(sequences, data)
    _check_analysis_set(batches, data.path, vocab=getattr(hf_config, "vocab_size", None))
    _check_address(config.cluster.address)
    num_params = _check_eigen_k(config, model_path) if config.eigen.k else None
    check_output_dir(config, fresh=fresh)
    return Prepared(config, model_path, batches, num_params=num_params)


def _check_eigen_k(config: RunConfig, model_path: str | None) -> int | None:
    """eigen.k within the Hessian's dimension: the parameters counted on the meta device (a second or so, only
    with eigen.k > 0), before anything is written to output_dir. Returns the count (None if the meta build
    failed: the ranks report that model)."""
    from hessian_core.models import parameter_count

    try:
        count = parameter_count(spec_for(config, model_path))
    except Exception:  # noqa: BLE001 - a model the meta build cannot make is the ranks' to report
        return None
    if config.eigen.k > count:
        raise ConfigError(f"eigen.k={config.eigen.k} exceeds the model's {count:,} parameters (the Hessian's "
                          f"dimension); set eigen.k <= {count}")
    return count


def _check_analysis_set(batches: torch.Tensor | BatchSet, data_path: str, *, vocab: int | None) -> None:
    """Token statistics of what the model attends to (padding is not data), ids and labels within the vocabulary,
    and a loss that counts at least one token (else the ranks would fail after the model load)."""
    if not isinstance(batches, BatchSet):
        batches = BatchSet(batches)
    ids, mask, labels = batches.input_ids, batches.attention_mask, batches.labels
    if int(ids.min()) < 0:  # padded positions included: the model embeds every position
        raise ConfigError(f"data.path {data_path!r} has token id {int(ids.min())}; token ids must be >= 0, "
                          f"padding included")
    check_token_statistics(ids if mask is None else ids[mask > 0], data_path=data_path)
    top = int(max(ids.max(), labels.max())) if labels is not None else batches.max_token_id()
    if vocab is not None and top >= vocab:
        raise ConfigError(f"data.path {data_path!r} has token id {top} but the model's vocab_size is "
                          f"{vocab}; the data was tokenized for another model")
    flat = {"input_ids": ids.flatten(0, 1), "attention_mask": None if mask is None else mask.flatten(0, 1),
            "labels": None if labels is None else labels.flatten(0, 1)}
    if counted_tokens({k: v for k, v in flat.items() if v is not None}) == 0:
        raise ConfigError(f"data.path {data_path!r}: the analysis set counts no token (every label is -100 or "
                          f"padded); give rows with labelled, attended tokens")


def _has_weights(path: str) -> bool:
    from hessian_core.models import has_weights

    return has_weights(path)


def _check_dcp(config: RunConfig, model_path: str) -> str | None:
    """A DCP checkpoint as model.path: its architecture (model.config_path or model.config) and its keys, checked
    against the model built on the meta device (nothing is read but metadata). Returns the config folder."""
    m = config.model
    if m.init != "pretrained" or m.loading == "full":
        key = "model.init" if m.init != "pretrained" else "model.loading"
        raise ConfigError(f"model.path {model_path!r} is a DCP checkpoint, which loads only as pretrained weights "
                          f"and sharded; {key}={getattr(m, key.split('.')[1])!r} is not valid with it")
    if m.config_path:
        if not os.path.isfile(os.path.join(m.config_path, "config.json")):
            raise ConfigError(f"model.config_path {m.config_path!r} has no config.json (expected the Hugging Face "
                              f"config folder of the DCP checkpoint's architecture)")
    elif not (m.config or {}).get("model_type"):
        raise ConfigError(f"model.path {model_path!r} is a DCP checkpoint and holds no architecture: set "
                          f"model.config_path (a folder with config.json) or model.config with model_type")
    _check_keys(config, model_path)
    return m.config_path


def _check_keys(config: RunConfig, model_path: str) -> None:
    """The checkpoint's keys, shapes and (DCP) data files against the model the ranks will build (metadata and
    headers only): a tensor missing from it would otherwise be loaded randomly initialised, or refused late."""
    from hessian_core.models import check_checkpoint

    try:
        check_checkpoint(spec_for(config, model_path), world_size=config.cluster.num_workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _hf_config(config: RunConfig, model_path: str | None):
    """The model's HF config as the ranks build it (``hessian_core.models.hf_config``), or None where it cannot
    be read without the network (a hub id offline: the ranks report it when loading)."""
    from hessian_core.models import hf_config

    try:
        return hf_config(spec_for(config, model_path))
    except Exception:  # noqa: BLE001 - offline hub ids and unknown model types raise many types
        return None


def _auto_address(address: str | None) -> tuple[str | None, str]:
    """The address a null or ``auto`` cluster.address will join (RAY_ADDRESS, else for ``auto`` the address
    file that `ray start` leaves in Ray's temp dir) and where it came from; None: nothing to check."""
    env = os.environ.get("RAY_ADDRESS")
    if env == "auto":
        address, env = "auto", None
    if env and env != "local":
        return (env if "://" not in env or env.startswith("ray://") else None), "RAY_ADDRESS"
    if address == "auto":
        from ray._private.utils import get_ray_address_file, read_ray_address

        return read_ray_address(), f"the address file {get_ray_address_file(None)}"
    return None, ""


def _check_address(address: str | None) -> None:
    """Refuse a ray://host:port or host:port nobody listens on within seconds (Ray itself retries for minutes),
    including the one that ``auto`` or RAY_ADDRESS leads to (a killed `ray start` leaves its address file)."""
    if address is None or address == "auto":
        found, origin = _auto_address(address)
        if found is None:
            return
        source = f"cluster.address {address!r} via {origin}, which names {found!r},"
        address = found
    else:
        source = f"cluster.address {address!r}"
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host or target, int(port) if host else 10001), timeout=10).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source} is unreachable ({e}); use null for a private local Ray (without RAY_ADDRESS), "
                          f"'auto', host:port of a running head node, or ray://host:port of its client server") from None


def model_spec(prepared: Prepared):
    """What each rank loads, from the config and the resolved model path."""
    return spec_for(prepared.config, prepared.model_path)


def spec_for(config: RunConfig, model_path: str | None):
    """The ``ModelSpec`` of ``config`` with ``model_path`` (the resolved model folder). The built-in demo, before
    the preflight has built its folder (``plan``), is its architecture with random weights: the same model."""
    from hessian_core.models import ModelSpec

    m = config.model
    if model_path == demo.DEMO:
        return ModelSpec(path=None, init="random", dtype=m.dtype, attn_implementation=m.attn_implementation,
                         config_overrides=demo.architecture(), compute_dtype=m.compute_dtype,
                         activation_checkpointing=m.activation_checkpointing)
    return ModelSpec(path=model_path, revision=m.revision, init=m.init, dtype=m.dtype,
                     attn_implementation=m.attn_implementation, config_overrides=m.config or {}, seed=m.seed,
                     config_path=m.config_path, loading=m.loading, compute_dtype=m.compute_dtype,
                     activation_checkpointing=m.activation_checkpointing)
