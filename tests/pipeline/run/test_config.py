"""Config presets parse and validate; overrides are typed; the bounds declared with each key are enforced, and
docs/config.md's configuration table is the one generated from the declarations."""

import glob
import json
import os
import re

import pytest

from pipeline.run.config import ConfigError, config_keys, load_config, reference_table

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "*.yaml")))
DEMO = ["model.path=builtin:demo", "data.path=builtin:demo"]
CONFIG_DOC = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "config.md")


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


@pytest.mark.parametrize("cluster,expected", [
    ({}, lambda cores: cores),  # a local Ray: this machine's cores shared out among the ranks
    ({"cluster.num_workers": 2, "cluster.num_groups": 3}, lambda cores: max(1, cores // 6)),
    ({"cluster.address": "auto"}, lambda cores: 1),  # a cluster's nodes are not this machine
    ({"cluster.cpus_per_worker": 3}, lambda cores: 3),
])
def test_cpus_per_worker_default_shares_out_a_local_machine(cluster, expected, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    config = load_config(PRESETS[0], [*DEMO, "cluster.num_workers=1", "cluster.num_groups=1",
                                      *(f"{k}={v}" for k, v in cluster.items())])
    assert config.cpus_per_worker() == expected(12)


@pytest.mark.parametrize("overrides,message", [
    ({"density.grid_size": 1}, "density.grid_size must be >= 2, got 1: a density needs at least its two end points"),
    ({"density.grid_size": 100_000_000}, "density.grid_size must be <= 100000, got 100000000"),
    ({"data.seq_len": 1}, "data.seq_len must be >= 2, got 1: a next-token loss needs two tokens"),
    ({"lanczos.steps": 10_001}, "lanczos.steps must be <= 10000 or 'auto', got 10001: SLQ's density"),
    ({"hvp.eps": 0}, "hvp.eps must be > 0 or 'auto', got 0.0"),
    ({"checkpoint.every": -1}, "checkpoint.every must be >= 0 or 'auto', got -1"),
    ({"blocks.spectra_steps": 0}, "blocks.spectra_steps must be >= 1 or null, got 0"),
    ({"cluster.worker_resources": {"spot": 0}}, "cluster.worker_resources.spot must be > 0, got 0"),
    ({"cluster.worker_resources": {"spot": "x"}}, "cluster.worker_resources.spot must be a number, got 'x'"),
    ({"data.split": ""}, "data.split is required"),
    ({"cluster.min_groups": 3, "cluster.num_groups": 2}, "cluster.min_groups must be <= cluster.num_groups=2"),
    ({"blocks.approximations": ["lowrank"]}, "blocks.approximations: 'lowrank' needs its rank, e.g. lowrank_8; valid: "
                                             "block_diagonal, block_tridiagonal, lowrank_<k>"),
    ({"blocks.approximations": ["lowrank_0"]}, "unknown approximation 'lowrank_0'"),
    ({"blocks.approximations": ["gauss_newton", "gauss_newton"]}, "names 'gauss_newton' twice"),
    ({"blocks.approximations": "gauss_newton"}, "blocks.approximations: 'gauss_newton' is not valid; expected a list "
                                                "of str"),
    ({"lanczos.operator": "fisher"}, "lanczos.operator: 'fisher' is not valid; expected 'hessian' or "
                                     "'gauss_newton' or 'residual'"),
], ids=lambda case: ",".join(case) if isinstance(case, dict) else None)
def test_a_bad_value_is_refused_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, DEMO + [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_every_declared_bound_is_enforced():
    """Just past each key's declared min, above or max is refused, before any rule between keys."""
    steps = {"min": -1, "above": 0, "max": 1}
    for name, f, tp in config_keys():
        if "dict" in str(tp):  # a mapping's bounds hold for its values, tested above
            continue
        for bound, step in steps.items():
            if f.metadata[bound] is not None:
                with pytest.raises(ConfigError, match=rf"^{re.escape(name)} must be "):
                    load_config(None, DEMO + [f"{name}={f.metadata[bound] + step}"])


def test_every_key_has_a_one_line_doc():
    for name, f, _ in config_keys():
        doc = f.metadata.get("doc", "")
        assert doc.strip() and "\n" not in doc and "|" not in doc, f"{name}: doc {doc!r}"


def test_config_doc_table_is_the_generated_one():
    text = open(CONFIG_DOC).read()
    table = text.split("<!-- config-table:begin -->\n")[1].split("\n<!-- config-table:end -->")[0]
    assert table == reference_table(), "docs/config.md is stale: paste `hessian-spectrum config-table` between the markers"
