"""Curvature where training happens: callbacks for the Hugging Face ``Trainer`` and for PyTorch Lightning, and log
sinks (TensorBoard, MLflow, W&B offline, a plain callable). A sub-package imported on its own; transformers,
lightning, tensorboard, mlflow and wandb are imported only by what uses them (``pip install -e ".[hf]"`` brings
accelerate and tensorboard).

    from hessian_core.integrations import HessianSpectrumCallback       # transformers.Trainer
    from hessian_core.integrations import HessianSpectrumLightningCallback
    from hessian_core.integrations import open_sinks                    # log_to=["tensorboard:DIR", ...]
"""

from __future__ import annotations

_LAZY = {
    "HessianSpectrumCallback": ".hf",
    "HessianSpectrumLightningCallback": ".lightning",
    "CurvatureMonitor": ".monitor",
    "LOGGED_KEYS": ".monitor",
    "Sinks": ".sinks",
    "open_sinks": ".sinks",
    "parse_sink": ".sinks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name], __name__), name)
