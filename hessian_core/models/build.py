"""``build(spec, device)``: the one place a model is constructed from its config or read whole.

transformers builds a model under a process-wide torch default dtype that it sets and restores; two builds in
threads of one process (a sweep's points) could leave it changed for good, and every later tensor with it.
Every build of the code base goes through ``build``, which holds one lock around that window, and nothing else
sets torch's default dtype. The driver's own builds change nothing there: its weightless copies (block names,
parameter count) are built in the default dtype itself, and the plan's verdict runs in the run's own thread
before Ray starts, so no tensor of a run, or of a sweep's other points, meets another default dtype.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

from ..numerics import float64_numerics
from .config import hf_config
from .spec import DTYPES, ModelSpec

_DEFAULT_DTYPE_LOCK = threading.Lock()  # held while transformers has torch's default dtype changed


def hf_kwargs(spec: ModelSpec) -> dict:
    """Keyword arguments for ``from_pretrained`` / ``from_config``: dtype, attention, and on transformers 5 the
    mixture-of-experts kernel: its default ``grouped_mm`` has no float64, so float64 uses the eager loop."""
    from transformers import PretrainedConfig

    kwargs = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation}
    if spec.dtype == "float64" and hasattr(PretrainedConfig(), "_experts_implementation"):
        kwargs["experts_implementation"] = "eager"
    return kwargs


def build(spec: ModelSpec, device: str | torch.device = "cpu", *, for_analysis: bool = True) -> nn.Module:
    """The model of ``spec`` in eval mode, its parameters in ``spec.dtype``:
    - ``meta``: parameters on the meta device (no memory), buffers real (computed as a real build computes them):
      the sharded loaders' start and the driver's block names and parameter count;
    - ``fake``: under a FakeTensorMode of its own (shapes and dtypes, no storage; re-enter it with
      ``fake_mode(model)`` to run it): the plan's trace;
    - ``cpu``, ``cuda`` or a torch.device: the weights themselves: pretrained ones read whole by transformers, or
      random ones drawn from ``spec.seed`` (every rank draws the same).
    ``for_analysis``: every parameter trainable and the float64 numerics of ``hessian_core.numerics``
    (``prepare_for_analysis``); False leaves the model as transformers builds it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank would drown the driver's progress output
    kind = "fake" if device == "fake" else torch.device(device).type
    if kind == "meta":
        with _building(), parameters_on_meta():
            model = _from_config(spec)
    elif kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with _building(), FakeTensorMode(allow_non_fake_inputs=True):
            model = _from_config(spec)
    else:
        with _building():
            model = _with_weights(spec)
        model = model.to(device)
    return prepare_for_analysis(model) if for_analysis else model.eval()


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """One build at a time, torch's default dtype as it was afterwards whatever transformers did to it."""
    with _DEFAULT_DTYPE_LOCK:
        before = torch.get_default_dtype()
        try:
            yield
        finally:
            torch.set_default_dtype(before)


def _from_config(spec: ModelSpec) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(spec), **hf_kwargs(spec))


def _with_weights(spec: ModelSpec) -> nn.Module:
    """Random weights from ``spec.seed``, or pretrained ones, none left randomly initialised."""
    from transformers import AutoModelForCausalLM

    if spec.init == "random":
        torch.manual_seed(spec.seed)  # every rank draws the same weights
        return _from_config(spec)
    model, info = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, output_loading_info=True,
                                                       **hf_kwargs(spec))
    if info["missing_keys"]:  # left randomly initialised; the preflight refuses this for local folders it reads
        raise ValueError(f"model.path {spec.path!r} has no tensor {sorted(info['missing_keys'])[0]!r} "
                         f"({len(info['missing_keys'])} missing): from_pretrained would leave it random")
    return model


def fake_mode(model: nn.Module):
    """The FakeTensorMode a ``build(..., device="fake")`` model lives in."""
    return next(model.parameters()).fake_mode


def prepare_for_analysis(model: nn.Module) -> nn.Module:
    """Eval mode (dropout off), every parameter trainable, float64 norms, routers and attention kept in float64
    (``hessian_core.numerics``, the same fixes ``analyze`` applies)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    float64_numerics(model)  # for good: the model exists only for the analysis
    return model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device at once; buffers stay real.

    A parameter is moved when it is assigned, before its module initialises it, so its (untouched) CPU
    memory is never resident. Buffers such as rotary ``inv_freq`` are computed exactly as a normal load
    computes them, which is why this is not simply ``with torch.device("meta")``."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
