"""Building models for analysis, Ray-free: the spec every rank builds from (``ModelSpec``), its Hugging Face
config (``hf_config``), the build on any device (``build``: meta, fake, cpu, cuda), the wrapping in one order
(``parallelize``: activation checkpointing, mixed precision, FSDP2), and the loaders of a rank's weights
(``load_for_rank``: whole, or only its shards from safetensors or DCP checkpoints, which
``check_checkpoint`` checks before any rank reads them)."""

from .build import build, fake_mode, hf_kwargs, parameters_on_meta, prepare_for_analysis
from .checkpoint_check import check_checkpoint
from .config import WEIGHT_FILES, checkpoint_format, has_weights, hf_config
from .loading import block_names, choose_loading, import_model_code, load_for_rank, load_model, parameter_count, reads_sharded
from .parallel import checkpoint_blocks, device_mesh, mixed_precision, needs_mesh, parallelize
from .spec import DTYPES, ModelSpec

__all__ = [
    "build", "fake_mode", "hf_kwargs", "parameters_on_meta", "prepare_for_analysis",
    "check_checkpoint",
    "WEIGHT_FILES", "checkpoint_format", "has_weights", "hf_config",
    "block_names", "choose_loading", "import_model_code", "load_for_rank", "load_model", "parameter_count",
    "reads_sharded",
    "checkpoint_blocks", "device_mesh", "mixed_precision", "needs_mesh", "parallelize",
    "DTYPES", "ModelSpec",
]
