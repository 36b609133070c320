"""Config presets parse and validate; overrides are typed."""

import glob
import os

import pytest

from pipeline.config import ConfigError, load_config

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_is_a_valid_config(path):
    config = load_config(path, ["cluster.use_gpu=false"])  # the machine running tests has no GPU
    assert config.data.path and (config.model.path or config.model.config)


def test_overrides_are_parsed_as_yaml_and_typed():
    config = load_config(PRESETS[0], ["hvp.eps=1e-4", "lanczos.steps=7", "data.shuffle_seed=3", "cluster.address=auto"])
    assert config.hvp.eps == 1e-4 and config.lanczos.steps == 7 and config.data.shuffle_seed == 3
    assert config.cluster.address == "auto"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PRESETS[0], ["lanczos.steps"])
